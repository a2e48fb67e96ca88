"""Import a GGUF file (llama.cpp / Ollama) as an slmkit model directory.

The `gguf` package reads the file and dequantizes every tensor type it knows; this module maps
the architecture's metadata keys to a `ModelConfig` and llama.cpp's tensor names to slmkit's.
Two layout differences are undone on the way in:

- llama-architecture files store q and k with the rows of each head permuted, because llama.cpp
  rotates adjacent pairs (2i, 2i + 1) where slmkit, like HF, rotates halves (i, i + d/2)
  (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py; undone here head by head).
- Gemma files store RMSNorm weights as (1 + w); slmkit's Gemma norm adds the 1 itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slmkit._io import atomic_dir
from slmkit.config import ModelConfig
from slmkit.convert.gguf_vocab import vocab_from_gguf
from slmkit.errors import InputError, MissingExtraError
from slmkit.model.io import cast_floats, save_model_dir
from slmkit.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("gguf", "gguf") from None
    return gguf


# ---------------------------------------------------------------------------- reading the file
@dataclass
class GGUFFile:
    """The metadata (key -> Python value) and the tensors (name -> reader tensor) of one file."""

    path: Path
    kv: dict[str, Any]
    tensors: dict[str, Any]

    @property
    def architecture(self) -> str:
        return self.kv.get("general.architecture", "")

    def key(self, name: str, default: Any = KeyError) -> Any:
        """`ARCH.name` (llama.cpp prefixes hyperparameters with the architecture)."""
        full = f"{self.architecture}.{name}"
        if full in self.kv:
            return self.kv[full]
        if default is KeyError:
            raise InputError(f"{self.path.name} lacks the metadata key {full}")
        return default

    def weight(self, name: str) -> torch.Tensor:
        """A tensor dequantized to float32, in PyTorch's [out, in] order."""
        if name not in self.tensors:
            raise InputError(f"{self.path.name} has no tensor {name}")
        t = self.tensors[name]
        return torch.from_numpy(np.array(_import_gguf().quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file; a file that is not GGUF, is cut short, or holds a tensor type that cannot
    be dequantized is an InputError naming it."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise InputError(f"cannot read {path} as GGUF (not a GGUF file, or truncated): {str(e).splitlines()[0]}") from None
    size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise InputError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                             f"the file has {size}")
        if t.tensor_type.name not in TENSOR_TYPES:
            raise InputError(f"{path.name}: tensor {t.name} has type {t.tensor_type.name}, which slmkit cannot "
                             f"dequantize (supported: {', '.join(TENSOR_TYPES)})")
        tensors[t.name] = t
    kv = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            kv[name] = field.contents()
    return GGUFFile(path, kv, tensors)


# ---------------------------------------------------------------------------- architectures
def _common(f: GGUFFile) -> dict[str, Any]:
    """The hyperparameters every supported architecture stores under the same keys."""
    n_heads = f.key("attention.head_count")
    n_kv = f.key("attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv, list):
        raise InputError(f"{f.path.name}: per-layer head counts are not supported")
    d_model = f.key("embedding_length")
    return {
        "vocab_size": f.tensors["token_embd.weight"].shape[1].item(),
        "context_length": f.key("context_length"),
        "d_model": d_model,
        "n_layers": f.key("block_count"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": f.key("attention.key_length", d_model // n_heads),
        "ffn_hidden": f.key("feed_forward_length"),
        "tie_embeddings": "output.weight" not in f.tensors,
    }


def _rope(f: GGUFFile) -> dict[str, Any]:
    """RoPE base and scaling: linear from the keys, Llama 3's from its `rope_freqs` factors."""
    theta = float(f.key("rope.freq_base", 10000.0))
    if any(name.startswith("rope_factors_") for name in f.tensors):
        raise InputError(f"{f.path.name} uses LongRoPE (rope_factors_long/short tensors), which is not supported")
    kind = f.key("rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        return {"rope_theta": theta, "rope_scaling": _llama3_scaling(f, theta)}
    if kind in ("none", None) or f.key("rope.scaling.factor", 1.0) == 1.0 and kind != "yarn":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": {"rope_type": "linear", "factor": float(f.key("rope.scaling.factor"))}}
    raise InputError(f"{f.path.name} uses {kind} RoPE scaling, which is not supported (linear, llama3)")


def _llama3_scaling(f: GGUFFile, theta: float) -> dict[str, Any]:
    """Llama 3.1+ files keep only the per-frequency divisors llama.cpp's converter computed; find
    the scaling parameters (Meta's published ones) that reproduce them exactly, or refuse."""
    from slmkit.model.layers import rope_frequencies

    freqs = f.weight("rope_freqs.weight")
    factor = round(freqs.max().item(), 4)
    dim = f.key("rope.dimension_count", None) or _common(f)["head_dim"]
    base = ModelConfig(d_model=dim, n_heads=1, rope_theta=theta)
    for old_len in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": old_len}
            divisors = rope_frequencies(base) / rope_frequencies(base.replace(rope_scaling=scaling))
            if torch.allclose(divisors, freqs, rtol=1e-4, atol=0):
                return scaling
    raise InputError(f"{f.path.name}: its rope_freqs factors match no Llama 3 RoPE scaling (factor {factor})")


_DECODER = dict(norm="rmsnorm", mlp="swiglu", pos="rope", attn_bias=False, attn_out_bias=False)


def _llama(f: GGUFFile) -> dict[str, Any]:
    bias = "blk.0.attn_q.bias" in f.tensors
    return {**_DECODER, **_common(f), **_rope(f), "norm_eps": f.key("attention.layer_norm_rms_epsilon"),
            "attn_bias": bias, "attn_out_bias": "blk.0.attn_output.bias" in f.tensors}


def _qwen2(f: GGUFFile) -> dict[str, Any]:
    return {**_llama(f), "attn_bias": True, "attn_out_bias": False}


def _qwen3(f: GGUFFile) -> dict[str, Any]:
    return {**_llama(f), "qk_norm": True}


def _phi3(f: GGUFFile) -> dict[str, Any]:
    window = f.key("attention.sliding_window", None)
    return {**_llama(f), "sliding_window": window or None}


def _gpt2(f: GGUFFile) -> dict[str, Any]:
    return {**_common(f), "norm": "layernorm", "mlp": "gelu_tanh", "pos": "learned", "attn_bias": True,
            "attn_out_bias": True, "mlp_bias": True, "norm_eps": f.key("attention.layer_norm_epsilon")}


def _gemma3(f: GGUFFile) -> dict[str, Any]:
    """5 sliding-window layers to one global, as llama.cpp runs Gemma 3; local layers rotate with
    base 10000, global ones with the file's base and scaling."""
    common = _common(f)
    n, window = common["n_layers"], f.key("attention.sliding_window", None)
    scale = (common["d_model"] / common["n_heads"]) ** -0.5 if n == 62 else None  # llama.cpp: 27B scales by d_model / heads
    return {**_DECODER, **common, **_rope(f), "norm_eps": f.key("attention.layer_norm_rms_epsilon"),
            "norm_plus_one": True, "embed_scale": True, "mlp": "geglu", "qk_norm": True, "output_norms": True,
            "attn_scale": scale, "attn_softcap": f.key("attn_logit_softcapping", None),
            "logit_softcap": f.key("final_logit_softcapping", None),
            "sliding_window": window, "sliding_window_layers": [i for i in range(n) if i % 6 != 5] if window else None,
            "rope_local_theta": 10000.0}


@dataclass(frozen=True)
class Architecture:
    config: Callable[[GGUFFile], dict[str, Any]]
    norms: dict[str, str]  # llama.cpp norm name -> slmkit module name, per layer
    permute_qk: bool = False  # llama.cpp's llama rope layout (see the module docstring)
    norm_offset: float = 0.0  # subtracted from norm weights (Gemma stores 1 + w)


_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {**_NORMS, "post_attention_norm": "attn_output_norm", "post_ffw_norm": "mlp_output_norm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_llama, _NORMS, permute_qk=True),
    "qwen2": Architecture(_qwen2, _NORMS),
    "qwen3": Architecture(_qwen3, {**_NORMS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
    "phi3": Architecture(_phi3, _NORMS),
    "gpt2": Architecture(_gpt2, _NORMS),
    "gemma3": Architecture(_gemma3, _GEMMA_NORMS, norm_offset=1.0),
}
_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The ModelConfig of a GGUF file's architecture keys."""
    arch = ARCHITECTURES.get(f.architecture)
    if arch is None:
        raise InputError(f"unsupported GGUF architecture {f.architecture!r} (general.architecture); "
                         f"supported: {', '.join(ARCHITECTURES)}")
    if "token_embd.weight" not in f.tensors:
        raise InputError(f"{f.path.name} has no token_embd.weight tensor")
    values = arch.config(f)
    try:
        return ModelConfig.from_dict(values)
    except InputError as e:
        raise InputError(f"{f.path.name} ({f.architecture}): {e}") from None


# ---------------------------------------------------------------------------- tensors
@dataclass
class Q8_0Blocks:
    """A Q8_0 matrix as the file stores it: int8 codes [rows, cols] and one fp16 scale per 32 codes
    of a row [rows, cols / 32]. Rows are selected as a tensor's are (`blocks[rows]`)."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def __getitem__(self, rows) -> Q8_0Blocks:
        return Q8_0Blocks(self.codes[rows], self.scales[rows])

    def dequantize(self) -> torch.Tensor:
        from slmkit.quant.rtn import dequantize

        return dequantize(self.codes, self.scales, None)


def q8_0_blocks(f: GGUFFile, name: str) -> Q8_0Blocks:
    """The codes and scales of a Q8_0 tensor, read from its 34-byte blocks (fp16 d, then 32 int8)."""
    t = f.tensors[name]
    rows = int(np.prod(t.shape[1:]))
    raw = np.ascontiguousarray(t.data).reshape(rows, -1, 34)
    scales = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0])
    return Q8_0Blocks(torch.from_numpy(raw[..., 2:].copy().view(np.int8).reshape(rows, -1)), scales)


def unpermute_llama_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp adjacent-pair rope rows (2i, 2i + 1) -> half-split rows (i, i + d/2), per head."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Weight = torch.Tensor | Q8_0Blocks


def state_from_gguf(f: GGUFFile, cfg: ModelConfig, keep_quant: bool = False) -> dict[str, Weight]:
    """slmkit's state dict from the file's tensors; every tensor must be used, and every one
    the model has must be given. With `keep_quant`, Q8_0 matrices stay `Q8_0Blocks`."""
    arch = ARCHITECTURES[f.architecture]

    def read(name: str) -> Weight:
        kept = keep_quant and f.tensors[name].tensor_type.name == "Q8_0" and len(f.tensors[name].shape) == 2
        return q8_0_blocks(f, name) if kept else f.weight(name)

    out: dict[str, Weight] = {"embed_tokens.weight": read("token_embd.weight")}
    names = {"position_embd": "pos.wpe", "output_norm": "norm", "output": "lm_head"}
    for i in range(cfg.n_layers):
        names |= {f"blk.{i}.{k}": f"layers.{i}.{v}" for k, v in {**_LINEARS, **arch.norms}.items()}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for name in f.tensors:
        module, _, kind = name.rpartition(".")
        block, _, part = module.rpartition(".")
        if name == "token_embd.weight" or name == "rope_freqs.weight":
            continue
        w = read(name)
        if part == "attn_qkv":  # gpt2, phi3: q, k, v in one tensor
            for p, rows in zip(("q", "k", "v"), (slice(0, q), slice(q, q + kv), slice(q + kv, None))):
                out[f"layers.{block[4:]}.self_attn.{p}_proj.{kind}"] = w[rows]
            continue
        if part == "ffn_up" and f.architecture == "phi3":  # gate and up in one tensor, gate first
            half = w.shape[0] // 2
            out[f"layers.{block[4:]}.mlp.gate_proj.{kind}"], out[f"layers.{block[4:]}.mlp.up_proj.{kind}"] = w[:half], w[half:]
            continue
        if module not in names:
            raise InputError(f"{f.path.name} has tensor {name}, which the {f.architecture} mapping does not use")
        if arch.permute_qk and part in ("attn_q", "attn_k"):
            w = w[unpermute_llama_rope(torch.arange(w.shape[0]), cfg.n_heads if part == "attn_q" else cfg.n_kv_heads)]
        if arch.norm_offset and "norm" in part:
            w = w - arch.norm_offset
        out[f"{names[module]}.{kind}"] = w
    return out


def load_gguf_model(f: GGUFFile, keep_quant: bool = False) -> Transformer:
    """The file's model in float32, with every weight checked against the config's shapes.

    `keep_quant` keeps every Q8_0 matrix quantized as a `Q8_0Linear`, which computes as llama.cpp
    does; the output head of a tied Q8_0 embedding is one too, while embeddings themselves are
    dequantized. A file without Q8_0 matrices is an error then."""
    cfg = config_from_gguf(f)
    if keep_quant and not any(t.tensor_type.name == "Q8_0" and len(t.shape) == 2 for t in f.tensors.values()):
        kinds = sorted({t.tensor_type.name for t in f.tensors.values() if len(t.shape) == 2})
        raise InputError(f"keeping the quantization (--keep-quant) keeps Q8_0 matrices, and {f.path.name} has none "
                         f"(its matrices are {', '.join(kinds)}); import it without --keep-quant")
    model = Transformer(cfg)
    state = state_from_gguf(f, cfg, keep_quant)
    expected = model.state_dict()
    for name, w in state.items():
        if name not in expected:
            raise InputError(f"{f.path.name}: {name} has no place in a {f.architecture} model with this config")
        if w.shape != expected[name].shape:
            raise InputError(f"{f.path.name}: {name} has shape {tuple(w.shape)}, the metadata implies {tuple(expected[name].shape)}")
    missing = set(expected) - set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if missing:
        raise InputError(f"{f.path.name} lacks the tensor for {min(missing)}")
    if cfg.tie_embeddings and isinstance(state["embed_tokens.weight"], Q8_0Blocks):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for name, w in list(state.items()):
        if not isinstance(w, Q8_0Blocks):
            continue
        module = name.removesuffix(".weight")
        if isinstance(model.get_submodule(module), torch.nn.Linear):
            del state[name]
            _install_q8_0(model, module, w, state.pop(f"{module}.bias", None))
        else:  # embeddings: a row lookup, exact in llama.cpp too
            state[name] = w.dequantize()
    model.load_state_dict(state, strict=False)
    return model.eval()


def _install_q8_0(model: Transformer, name: str, w: Q8_0Blocks, bias: torch.Tensor | None) -> None:
    from slmkit.quant.linear import Q8_0Linear
    from slmkit.quant.targets import set_module

    linear = model.get_submodule(name)
    module = Q8_0Linear(linear.in_features, linear.out_features, linear.bias is not None)
    set_module(model, name, module.set_weights(w.codes, w.scales, None, bias=bias))


def kept_quantization(model: Transformer) -> dict[str, Any] | None:
    """config.json's "quantization" section of a model with `Q8_0Linear`s (None: none)."""
    from slmkit.quant.linear import Q8_0Linear

    modules = [name for name, m in model.named_modules() if isinstance(m, Q8_0Linear)]
    return {"method": "q8_0", "bits": 8, "group_size": 32, "symmetric": True, "modules": modules} if modules else None


# ---------------------------------------------------------------------------- the model directory
def from_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32", *, keep_quant: bool = False,
              force: bool = False) -> Path:
    """Convert a GGUF file (a path, or the name of an installed model, see `slmkit models`) into
    the model directory `out`: weights dequantized to `dtype`, the tokenizer as tokenizer.json, the
    chat template and its stop tokens. `keep_quant` keeps Q8_0 matrices quantized, computing as
    llama.cpp does (see `load_gguf_model`); the directory is then a quantized model directory."""
    from slmkit.chat import ChatFormat
    from slmkit.convert.local_models import resolve_gguf
    from slmkit.tokenizer.hf_backend import HFTokenizer

    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    f = read_gguf(resolve_gguf(src))
    model = load_gguf_model(f, keep_quant)
    cast_floats(model, DTYPES[dtype])  # quantized codes and scales stay as stored
    vocab = vocab_from_gguf(f.kv, model.cfg.context_length)
    tokenizer = HFTokenizer(json.dumps(vocab.tokenizer_json, ensure_ascii=False), vocab.config)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise InputError(f"{f.path.name}: the tokenizer has {tokenizer.vocab_size} tokens, the embedding only {model.cfg.vocab_size} rows")
    with atomic_dir(out, force=force) as tmp:
        save_model_dir(model, tmp, tokenizer, {"stop_tokens": _stop_tokens(f.kv, tokenizer)}, kept_quantization(model),
                       sampling_defaults=False)
        chat = ChatFormat.for_tokenizer(tokenizer, _stop_tokens(f.kv, tokenizer)) if tokenizer.chat_template else None
        if chat is not None:
            chat.save(tmp)
    return Path(out)


def _stop_tokens(kv: dict[str, Any], tokenizer) -> list[str]:
    """End of text, and the end-of-turn / end-of-message tokens llama.cpp also stops at."""
    tokens = kv["tokenizer.ggml.tokens"]
    ids = [kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(tokens[i] for i in ids if i is not None and tokens[i] in tokenizer.special_tokens))
