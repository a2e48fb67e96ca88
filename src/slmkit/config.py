"""`ModelConfig`: every architecture choice of the one Transformer, as JSON-serializable data.

Presets are plain dictionaries of overrides; `ModelConfig.from_preset("tiny", n_layers=6)` and
`--set n_layers=6` go through the same path, and an unknown key is an error that names the
closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from slmkit.errors import InputError


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 4096
    context_length: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_heads
    ffn_hidden: int | None = None  # None: 4 * d_model (gelu), 8/3 * d_model rounded up (gated)
    ffn_multiple_of: int = 64
    # components (names from the registries in slmkit.model.layers)
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_plus_one: bool = False  # Gemma's (1 + w) RMSNorm
    mlp: str = "swiglu"  # gelu | gelu_tanh | swiglu | geglu
    pos: str = "rope"  # learned | sinusoidal | rope | alibi | none
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3", "factor": ..., ...}
    # details
    attn_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm only
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    qk_norm: bool = False
    logit_softcap: float | None = None
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    causal: bool = True  # False: a bidirectional encoder (masked-LM objective)
    dropout_embd: float = 0.0
    dropout_attn: float = 0.0
    dropout_resid: float = 0.0
    init_std: float = 0.02
    attention: str = "sdpa"  # sdpa (fast) | reference (from scratch); same numbers
    attn_out_bias: bool | None = None  # None: = attn_bias (Qwen2 has q/k/v biases but none on o_proj)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim) (Gemma 2: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # cap * tanh(scores / cap) on attention scores (Gemma 2)
    sliding_window: int | None = None  # a query sees at most this many keys, itself included (Mistral, Gemma 2)
    sliding_window_layers: list[int] | None = None  # layers that use the window; None: all of them
    output_norms: bool = False  # norm the attention and MLP outputs before the residual add (Gemma 2)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise InputError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.ffn_hidden is None:
            if self.mlp in ("swiglu", "geglu"):
                hidden = int(8 * self.d_model / 3)
                self.ffn_hidden = -(-hidden // self.ffn_multiple_of) * self.ffn_multiple_of
            else:
                self.ffn_hidden = 4 * self.d_model
        if self.attn_out_bias is None:
            self.attn_out_bias = self.attn_bias
        if self.pos == "rope" and self.head_dim % 2:
            raise InputError(f"rope needs an even head_dim, not {self.head_dim}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        values = {k: v for k, v in values.items() if k != "slmkit_version"}
        check_keys(values, cls)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"no model config at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with `overrides`. Sizes that equal their derived value (head_dim = d_model / n_heads,
        ...) are derived again from the new values; sizes set to anything else stay as they were."""
        check_keys(overrides, type(self))
        values = self.to_dict()
        for key in _DERIVED:
            derived = getattr(dataclasses.replace(self, **{k: None for k in _DERIVED}), key)
            if key not in overrides and values[key] == derived:
                values[key] = None
        return type(self)(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DERIVED = ("n_kv_heads", "head_dim", "ffn_hidden")  # None means: derive in __post_init__


def check_keys(values: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise InputError(f"unknown config key {key!r}{_suggest(key, valid)}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["n_layers=6", "pos=alibi", "rope_scaling={\\"type\\": \\"linear\\", \\"factor\\": 2}"]` -> dict.
    Values are read as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set takes key=value, not {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False, norm_eps=1e-5)
_GPT2 = dict(
    vocab_size=50257, context_length=1024, norm="layernorm", mlp="gelu_tanh", pos="learned",
    attn_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5,
)
PRESETS: dict[str, dict[str, Any]] = {
    # llama-style, ~5M parameters: trains at thousands of tokens/s on a laptop CPU
    "tiny": dict(_LLAMA, vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "gpt2-small": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "llama-20m": dict(_LLAMA, vocab_size=8192, context_length=512, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, tie_embeddings=True),
    "llama-100m": dict(_LLAMA, vocab_size=32000, context_length=1024, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4),
    "llama-1b": dict(_LLAMA, vocab_size=128256, context_length=2048, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, rope_theta=500000.0, tie_embeddings=True),
}
