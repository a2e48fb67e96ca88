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
import types
import typing
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
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers, unscaled (Gemma 3); None: as the others
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
    # mixture of experts / latent attention / multi-token prediction / fp8
    attention_kind: str = "mha"  # mha (MHA/GQA/MQA by n_kv_heads) | mla (multi-head latent attention)
    rope_dim: int | None = None  # dims rotated by RoPE (None: head_dim; MLA: qk_rope_head_dim)
    q_lora_rank: int | None = None  # MLA: rank of the compressed query (None: a full q_proj)
    kv_lora_rank: int = 0  # MLA: rank of the joint key-value latent, the only per-head state cached
    qk_nope_head_dim: int = 0  # MLA: per-head query/key dims without position
    qk_rope_head_dim: int = 0  # MLA: dims of the decoupled RoPE query/key (one key shared by all heads)
    v_head_dim: int = 0  # MLA: per-head value dims
    mla_absorb: bool = False  # MLA: fold the up-projections into query and output (inference form)
    ffn_kind: str = "dense"  # dense | moe
    n_experts: int = 0  # routed experts per MoE layer
    n_experts_per_tok: int = 2  # top-k
    n_shared_experts: int = 0  # experts every token passes through
    moe_ffn_hidden: int | None = None  # width of one expert (None: ffn_hidden)
    first_k_dense: int = 0  # the first k layers keep a dense MLP
    router_score: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True  # renormalize the top-k weights to sum to 1
    routed_scaling: float = 1.0  # multiplies the routed experts' weights
    n_expert_groups: int = 1  # group-limited routing: experts split into groups ...
    topk_groups: int = 1  # ... and each token picks experts from its best groups only
    aux_loss_coef: float = 0.0  # auxiliary balance loss weight (0: off)
    router_bias_rate: float = 0.0  # auxiliary-loss-free balancing: bias step per update (0: off)
    capacity_factor: float | None = None  # tokens per expert = factor * tokens * k / n_experts; None: dropless
    mtp_depth: int = 0  # multi-token prediction modules (predicting t+2 .. t+1+depth)
    mtp_loss_weight: float = 0.3  # weight of the mean MTP loss added to the LM loss
    fp8: str = "none"  # none | blockwise (1x128 activation tiles, 128x128 weight blocks) | tensor (per-tensor)

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
        if self.attention_kind == "mla":
            self._check_latent_attention()
        if self.pos == "rope" and (self.rope_dim or self.head_dim) % 2:
            raise InputError(f"rope needs an even head_dim, not {self.rope_dim or self.head_dim}")
        if self.ffn_kind == "moe":
            self._check_experts()
        if self.mtp_depth and not self.causal:
            raise InputError("multi-token prediction (mtp_depth) needs a causal model")

    def _check_latent_attention(self) -> None:
        """MLA: one query/key head of nope + rope dims; every query head has its own key and value."""
        if min(self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim) < 1:
            raise InputError("attention_kind=mla needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim >= 1")
        self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.n_kv_heads = self.n_heads
        self.rope_dim = self.qk_rope_head_dim

    def _check_experts(self) -> None:
        if self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise InputError(f"ffn_kind=moe needs 1 <= n_experts_per_tok ({self.n_experts_per_tok}) <= n_experts ({self.n_experts})")
        if self.router_score not in ("softmax", "sigmoid"):
            raise InputError(f"router_score must be softmax or sigmoid, not {self.router_score!r}")
        if self.n_experts % self.n_expert_groups or not 1 <= self.topk_groups <= self.n_expert_groups:
            raise InputError(f"n_experts {self.n_experts} must split into n_expert_groups {self.n_expert_groups}, "
                             f"with 1 <= topk_groups ({self.topk_groups}) <= n_expert_groups")
        if self.topk_groups * (self.n_experts // self.n_expert_groups) < self.n_experts_per_tok:
            raise InputError("topk_groups leave fewer experts than n_experts_per_tok; raise topk_groups")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        if not isinstance(values, dict):
            raise InputError(f"a model config is a JSON object of settings, not {type(values).__name__}")
        values = {k: v for k, v in values.items() if k != "slmkit_version"}
        check_keys(values, cls)
        check_types(values, cls)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        known = {**PRESETS, **REAL_SIZES}
        if name not in known:
            raise InputError(f"unknown preset {name!r}{_suggest(name, known)}; presets: {', '.join(known)}")
        return cls.from_dict({**known[name], **overrides})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        from slmkit._io import read_json

        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"no model config at {path}")
        values = read_json(path)
        try:
            return cls.from_dict(values)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with `overrides`. Sizes that equal their derived value (head_dim = d_model / n_heads,
        ...) are derived again from the new values; sizes set to anything else stay as they were."""
        check_keys(overrides, type(self))
        check_types(overrides, type(self))
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


def check_types(values: dict[str, Any], cls: type) -> None:
    """Each value of the JSON kind its field declares (no true for 1, no "big" for a size)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _is_a(value, hints[key]):
            raise InputError(f"config key {key!r} must be {_kind(hints[key])}, not {value!r}")


def _is_a(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # a JSON number without a fraction is fine for a float
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, hint)


def _kind(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is list:
        return f"a list of {_kind(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
            dict: "an object"}.get(origin or hint, str(hint))


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
_DEEPSEEK = dict(_LLAMA, attention_kind="mla", ffn_kind="moe", router_score="sigmoid", norm_eps=1e-6)
PRESETS: dict[str, dict[str, Any]] = {
    # llama-style, ~5M parameters: trains at thousands of tokens/s on a laptop CPU
    "tiny": dict(_LLAMA, vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "gpt2-small": dict(_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(_GPT2, d_model=1280, n_layers=36, n_heads=20),
    "llama-20m": dict(_LLAMA, vocab_size=8192, context_length=512, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, tie_embeddings=True),
    "llama-100m": dict(_LLAMA, vocab_size=32000, context_length=1024, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4),
    "llama-1b": dict(_LLAMA, vocab_size=128256, context_length=2048, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, rope_theta=500000.0, tie_embeddings=True),

    # mixture of experts, latent attention, multi-token prediction: tiny versions train on a laptop CPU
    "deepseek-tiny": dict(_DEEPSEEK, vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4,
                          q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                          ffn_hidden=512, n_experts=8, n_experts_per_tok=2, n_shared_experts=1, moe_ffn_hidden=128,
                          first_k_dense=1, n_expert_groups=2, topk_groups=1, routed_scaling=1.0,
                          router_bias_rate=1e-2, aux_loss_coef=1e-4, mtp_depth=1),
    "mixtral-tiny": dict(_LLAMA, vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                         ffn_hidden=384, ffn_kind="moe", n_experts=8, n_experts_per_tok=2, aux_loss_coef=0.01),
    "qwen3-moe-tiny": dict(_LLAMA, vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                           head_dim=64, qk_norm=True, norm_eps=1e-6, ffn_kind="moe", n_experts=16, n_experts_per_tok=4,
                           moe_ffn_hidden=128, aux_loss_coef=0.001),
}
# The published sizes of the frontier families, for `slmkit inspect` (counting needs no weights); they are
# presets too, kept apart so that nothing iterating the trainable presets builds 671B parameters.
REAL_SIZES: dict[str, dict[str, Any]] = {
    "deepseek-v3-671b": dict(_DEEPSEEK, vocab_size=129280, context_length=4096, d_model=7168, n_layers=61, n_heads=128,
                             q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             ffn_hidden=18432, n_experts=256, n_experts_per_tok=8, n_shared_experts=1, moe_ffn_hidden=2048,
                             first_k_dense=3, n_expert_groups=8, topk_groups=4, routed_scaling=2.5,
                             router_bias_rate=1e-3, aux_loss_coef=1e-4, mtp_depth=1),
    "mixtral-8x7b": dict(_LLAMA, vocab_size=32000, context_length=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         ffn_hidden=14336, rope_theta=1e6, ffn_kind="moe", n_experts=8, n_experts_per_tok=2, aux_loss_coef=0.02),
    "qwen3-30b-a3b": dict(_LLAMA, vocab_size=151936, context_length=40960, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                          head_dim=128, qk_norm=True, norm_eps=1e-6, rope_theta=1e6, ffn_hidden=6144, ffn_kind="moe",
                          n_experts=128, n_experts_per_tok=8, moe_ffn_hidden=768, aux_loss_coef=0.001),
}
