"""ONNX export of the decoder with its KV cache as inputs and outputs, for ONNX Runtime.

Two kinds of graph, chosen by `graph` ("auto": fused whenever the config allows it):

- fused: llama-style models (rmsnorm, swiglu, rope, no biases; `onnx_fused.unsupported_reason`)
  are written node by node onto ONNX Runtime's fused kernels (GroupQueryAttention with an
  in-place KV buffer, SkipSimplifiedLayerNormalization); see `slmkit.export.onnx_fused`.
- traced: any other decoder goes through `torch.onnx.export` (dynamo), with the interface the
  Hugging Face / optimum ecosystem uses for decoders:

    inputs   input_ids [batch, seq], attention_mask [batch, past + seq],
             past_key_values.N.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab], present.N.key / .value [batch, kv_heads, past + seq, head_dim]

  Positions come from the attention mask (left padding does not shift them), exactly as in
  `Transformer.forward`. A prefill passes a past of length 0.

Right after export the graph is run on ONNX Runtime (through `slmkit.generation.ort.OrtModel`,
as generation runs it) and compared with PyTorch over a left-padded prefill and decode steps; an
export that does not reproduce the logits fails. The export directory is self-contained:
model.onnx, config.json, tokenizer files, generation.json and export.json (which graph kind was
written and why, and the measured difference from PyTorch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slmkit._io import atomic_dir, write_json
from slmkit.errors import ExportError, InputError, MissingExtraError, OutputExistsError
from slmkit.export.onnx_fused import (
    DEFAULT_OPSET,
    FUSED_INPUTS,
    LM_HEAD_NODE,
    build_fused_decoder,
    unsupported_reason,
)
from slmkit.model.cache import Cache
from slmkit.model.io import load
from slmkit.model.transformer import Transformer

ONNX_FILE = "model.onnx"
EXPORT_INFO = "export.json"
MODEL_DIR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation.json")
Quantize = Literal["int8", "int4"]
GraphKind = Literal["auto", "fused", "traced"]
TOLERANCE = 1e-4  # largest |logit difference| accepted (fp32), relative to max(1, the largest |logit|)
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB; larger weights go to model.onnx.data


def past_names(n_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", *past_names(n_layers)]


def output_names(n_layers: int) -> list[str]:
    return ["logits", *past_names(n_layers, "present")]


class PastKeyValues(Cache):
    """The model's cache interface over given past tensors: `update` returns past + new (the
    `present` outputs) instead of writing into a preallocated buffer."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.length = past[0][0].shape[2]
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = list(past)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        self.present[layer] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        return self.present[layer]

    def advance(self, n: int) -> None:
        """Nothing to do: the caller feeds `present` back as the next `past`."""


class DecoderWithPast(nn.Module):
    """The Transformer with explicit past/present key-value tensors, the shape ONNX needs."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cache = PastKeyValues(past)
        logits = self.model(input_ids, attention_mask=attention_mask, cache=cache)
        return logits, cache.present


def empty_past(model: Transformer, batch: int, length: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = model.cfg
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layers)]


def _require_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(module, "onnx") from None


def export_decoder(model: Transformer, path: Path, opset: int | None = None, external_data: bool = False) -> None:
    """torch.export (dynamo) -> ONNX with dynamic batch, sequence and past-sequence axes;
    `external_data` puts the weights beside it in `path`.data (needed past protobuf's 2 GiB)."""
    from torch.export import Dim

    cfg = model.cfg
    sample_batch, sample_seq, sample_past = 2, 3, 4  # distinct sizes, so no axis is taken for another
    ids = torch.zeros(sample_batch, sample_seq, dtype=torch.long)
    mask = torch.ones(sample_batch, sample_past + sample_seq, dtype=torch.long)
    past = empty_past(model, sample_batch, sample_past)
    batch = Dim("batch_size")
    seq = Dim("sequence_length", max=cfg.context_length)
    past_len = Dim("past_sequence_length", max=cfg.context_length)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},
        "past": [({0: batch, 2: past_len}, {0: batch, 2: past_len}) for _ in range(cfg.n_layers)],
    }
    with _quiet_exporter():
        program = torch.onnx.export(
            DecoderWithPast(model).eval(), (ids, mask, past), dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=input_names(cfg.n_layers), output_names=output_names(cfg.n_layers),
            opset_version=opset, verbose=False,
        )
    program.save(str(path), external_data=external_data)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about every missing torchvision op and deprecated call; none matter here."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def validation_inputs(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A left-padded prefill of two rows and two decode steps after it: (ids, mask) pairs."""
    cfg = model.cfg
    prompt = max(2, min(8, cfg.context_length - 2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, prompt), generator=g)
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[1, :2] = 0
    steps = []
    for _ in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        steps.append((torch.randint(0, cfg.vocab_size, (2, 1), generator=g), mask))
    return [(ids, mask[:, :prompt]), *steps]


@torch.inference_mode()
def max_difference(model: Transformer, onnx_path: Path) -> tuple[float, float]:
    """(largest |logit difference| between ONNX Runtime and PyTorch, largest |PyTorch logit|) over a
    left-padded prefill and decode steps, at the positions of real tokens (each side runs on its own
    cache). The config must already sit beside `onnx_path`."""
    from slmkit.generation.ort import OrtModel

    ort_model = OrtModel(onnx_path)
    cache, ort_cache = model.new_cache(2), ort_model.new_cache(2)
    worst = largest = 0.0
    for ids, mask in validation_inputs(model):
        expected, got = model(ids, attention_mask=mask, cache=cache), ort_model(ids, attention_mask=mask, cache=ort_cache)
        real = mask[:, -ids.shape[1]:].bool()
        worst = max(worst, float((got - expected).abs()[real].max()))
        largest = max(largest, float(expected.abs()[real].max()))
    return worst, largest


def quantize_onnx(src: Path, dst: Path, method: Quantize, block_size: int = 32) -> None:
    """ONNX Runtime's own weight quantizers: dynamic int8 (int8 weights, activations quantized
    per call) or 4-bit blockwise weights for the MatMulNBits kernel (int8 activations inside the
    kernel, accuracy_level 4: the fast path on CPU). The fused graph's output projection stays fp32:
    quantizing it costs more accuracy than any other MatMul."""
    import onnx

    root_level = logging.getLogger().level
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(root_level)  # importing the quantizer turns on INFO logging for everyone

    large = src.with_name(src.name + ".data").exists()
    if method == "int8":
        # shape inference knows no types past com.microsoft ops (the fused graph's attention): they are float
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=large, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                         nodes_to_exclude=[LM_HEAD_NODE])
    elif method == "int4":
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                                         accuracy_level=4, nodes_to_exclude=[LM_HEAD_NODE])
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=large)
    else:
        raise InputError(f"unknown ONNX quantization {method!r}; choose int8 or int4")


def export_onnx(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    opset: int | None = None,
    quantize: Quantize | None = None,
    force: bool = False,
    tolerance: float = TOLERANCE,
    graph: GraphKind = "auto",
) -> Path:
    """Export a model directory to a self-contained ONNX directory; returns its path.

    `graph` picks the fused graph (llama-style models only) or the traced one; "auto" takes the
    fused one whenever the config allows it. The fp32 graph must match PyTorch within `tolerance`
    relative to the logits (max |logit difference| <= tolerance * max(1, max |logit|): float32
    rounding grows with the values summed) or the export fails and nothing is written. `quantize`
    then replaces it with an int8 or int4 graph. The options and the output path are checked
    before the model is loaded.
    """
    _require_onnx()
    if quantize not in (None, "int8", "int4"):
        raise InputError(f"unknown ONNX quantization {quantize!r}; choose int8 or int4")
    if graph not in ("auto", "fused", "traced"):
        raise InputError(f"unknown ONNX graph kind {graph!r}; choose auto, fused or traced")
    if not tolerance > 0:
        raise InputError(f"--tolerance must be > 0, not {tolerance}")
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    model_dir = Path(model_dir)
    model, _ = load(model_dir, dtype="float32")  # ONNX Runtime runs the float32 graph
    if not model.cfg.causal:
        raise InputError("ONNX export is for causal decoders; this model is a bidirectional encoder (causal: false)")
    reason = unsupported_reason(model.cfg)
    if graph == "fused" and reason:
        raise InputError(f"the fused ONNX graph cannot express this model ({reason}); use --graph traced or auto")
    kind = "traced" if graph == "traced" or reason else "fused"
    with atomic_dir(out, force) as tmp:
        for name in MODEL_DIR_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        path = tmp / ONNX_FILE
        fp32 = tmp / "model.fp32.onnx" if quantize else path
        large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
        if kind == "fused":
            build_fused_decoder(model, fp32, opset, external_data=large)
            names = ([*FUSED_INPUTS, *past_names(model.cfg.n_layers)], output_names(model.cfg.n_layers))
        else:
            export_decoder(model, fp32, opset, external_data=large)
            names = (input_names(model.cfg.n_layers), output_names(model.cfg.n_layers))
        difference, largest = max_difference(model, fp32)
        bound = tolerance * max(1.0, largest)
        if not difference <= bound:
            raise ExportError(f"ONNX Runtime logits differ from PyTorch by {difference:.2e} (> {bound:.2e}: --tolerance "
                              f"{tolerance:g} of the largest |logit| {largest:.3g}); the export is not faithful")
        info: dict[str, Any] = {"format": "onnx", "graph": kind, "opset": opset or (DEFAULT_OPSET if kind == "fused" else None),
                                "quantize": quantize, "max_abs_difference_fp32": difference, "max_abs_logit": largest,
                                "tolerance": tolerance, "inputs": names[0], "outputs": names[1]}
        if kind == "traced" and graph == "auto":
            info["traced_because"] = reason
        if quantize:
            quantize_onnx(fp32, path, quantize)
            for file in tmp.glob(fp32.name + "*"):
                file.unlink()
            info["max_abs_difference_quantized"] = max_difference(model, path)[0]
        write_json(tmp / EXPORT_INFO, info)
    return Path(out)
