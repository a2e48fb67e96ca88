"""Model directories, the format every stage reads and writes:

    config.json          ModelConfig (every architecture field) + "slmkit_version"
    model.safetensors    weights
    tokenizer.json       HF tokenizers format (+ tokenizer_config.json with the chat template)
    generation.json      default sampling settings, stop tokens, chat template name
    adapters/NAME/       LoRA adapters, optional
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from slmkit import __version__
from slmkit._io import read_json, write_json
from slmkit.config import ModelConfig
from slmkit.devices import resolve_device, resolve_dtype
from slmkit.errors import InputError
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 256}  # for models trained here


def save_model_dir(
    model: Transformer,
    directory: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    generation: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    *,
    sampling_defaults: bool = True,
) -> Path:
    """Write a model directory. Callers that must not leave a partial one write into
    `slmkit._io.atomic_dir`. A quantized model passes its `quantization` section (see
    `slmkit.quant`): config.json records it and the weights file holds its codes and scales.
    With a tokenizer, generation.json holds the end-of-text stop token and `generation`, over
    `SAMPLING_DEFAULTS` unless `sampling_defaults` is false (an imported model keeps its own)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**model.cfg.to_dict(), "slmkit_version": __version__}
    if quantization is not None:
        config["quantization"] = quantization
    write_json(directory / "config.json", config)
    model.use_decoding_layout(False)  # safetensors writes contiguous tensors only
    save_safetensors(model, str(directory / WEIGHTS))
    if tokenizer is not None:
        tokenizer.save(directory)
        defaults = SAMPLING_DEFAULTS if sampling_defaults else {}
        stops = [tokenizer.eot_token] if tokenizer.eot_token else []
        write_json(directory / "generation.json", {**defaults, "stop_tokens": stops, **(generation or {})})
    return directory


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> Transformer:
    """A model directory -> its Transformer in eval mode on `device` (auto, cpu, cuda[:N], mps), in
    `dtype` (auto, float32, bfloat16, float16; None: as stored). A quantized model keeps its codes
    and scales as stored; only its float weights take `dtype`."""
    device = resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype, device)
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise InputError(f"{directory} is not a model directory (no config.json)")
    cfg, quantization = read_config(directory)
    model = Transformer(cfg)
    if quantization is not None:  # build the quantized modules the weights file holds
        from slmkit.quant.linear import install

        install(model, quantization)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise InputError(f"{directory} has no {WEIGHTS}")
    try:
        open(weights, "rb").close()  # safetensors reports an unreadable file as a missing one
    except OSError as e:
        raise InputError(f"cannot read {weights}: {e.strerror.lower()}") from None
    try:
        cast_floats(model, dtype or stored_dtype(weights))  # then loading copies the weights without a cast
        load_safetensors(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise InputError(f"cannot read weights from {weights} (corrupt, truncated or for another config): {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(weights: str | os.PathLike) -> torch.dtype:
    """The dtype a model's float weights are stored in (read from its embeddings' header entry)."""
    with safe_open(str(weights), framework="pt") as f:
        return STORED_DTYPES.get(f.get_slice("embed_tokens.weight").get_dtype(), torch.float32)


def cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Float parameters and buffers to `dtype` in place, except the stored codes and scales of
    quantized layers (`model.to(dtype)` would also turn fp8 weights into `dtype`)."""
    from slmkit.quant.linear import QUANTIZED_LINEARS

    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        if not isinstance(module, QUANTIZED_LINEARS):
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point():
                    module._buffers[name] = b.to(dtype)


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any] | None]:
    """config.json -> (the architecture, the "quantization" section of a quantized model or None)."""
    path = Path(directory) / "config.json"
    values = read_json(path)
    quantization = values.pop("quantization", None) if isinstance(values, dict) else None
    try:
        return ModelConfig.from_dict(values), quantization
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def load(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         adapter: str | os.PathLike | None = None) -> tuple[Transformer, Tokenizer]:
    """A model directory -> (model in eval mode on `device`, in `dtype`, tokenizer); see `load_model`.
    `adapter` applies a LoRA adapter: a name under `directory/adapters/`, or an adapter directory
    (slmkit's layout or one PEFT wrote for the model's Hugging Face export)."""
    model = load_model(directory, device, dtype)
    if adapter is not None:
        from slmkit.model.lora import find_adapter, load_adapter

        load_adapter(model, find_adapter(directory, adapter))
    return model, Tokenizer.load(directory)


def generation_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "generation.json"
    return read_json(path) if path.is_file() else {}
