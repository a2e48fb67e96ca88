"""One small mapping per Hugging Face model family: config translation and tensor names, both ways.

A family says which `ModelConfig` fields are the same for all of its models (`fixed`), how the
rest are read from and written to the HF `config.json`, and how each HF tensor corresponds to one
or more slmkit tensors (several when HF fuses them, as GPT-2's `c_attn` or Phi-3's `qkv_proj`).
Adding a family is adding one `Family` to `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from slmkit.config import ModelConfig
from slmkit.errors import InputError

if TYPE_CHECKING:
    import torch

# HF config keys that never change the computation of a causal LM's logits.
HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "_model_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
    "attn_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "task_specific_params", "problem_type", "tokenizer_class", "prefix", "max_length", "num_beams",
    "use_return_dict", "n_ctx", "reorder_and_upcast_attn", "original_max_position_embeddings",
    "max_window_layers", "use_sliding_window", "layer_types", "use_bidirectional_attention",
})
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class InterleavedRope:
    """Rows in blocks of `block` (one block per head) whose last `rope` rows make RoPE dimensions:
    HF stores them as adjacent pairs (2i, 2i + 1) (DeepSeek's `rope_interleave`), slmkit rotates
    the halves (i, i + rope/2). Keys and queries are reordered alike, so their products are unchanged."""

    block: int
    rope: int

    def to_ours(self, w: torch.Tensor) -> torch.Tensor:
        return self._reorder(w, [*range(0, self.rope, 2), *range(1, self.rope, 2)])

    def to_hf(self, w: torch.Tensor) -> torch.Tensor:
        half = self.rope // 2
        return self._reorder(w, [i // 2 + half * (i % 2) for i in range(self.rope)])

    def _reorder(self, w: torch.Tensor, order: list[int]) -> torch.Tensor:
        blocks = w.reshape(-1, self.block, *w.shape[1:]).clone()
        blocks[:, self.block - self.rope:] = blocks[:, self.block - self.rope:][:, order]
        return blocks.reshape(w.shape)


@dataclass(frozen=True)
class Tensor:
    """One HF tensor = slmkit tensors `ours` concatenated along dim 0, transposed when `transpose`
    (GPT-2's Conv1D stores [in, out]), with its rows reordered when `rows` says HF orders them otherwise."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False
    rows: InterleavedRope | None = None


@dataclass(frozen=True)
class Family:
    name: str  # HF model_type
    architecture: str  # the transformers class that loads it
    fixed: dict[str, Any]  # ModelConfig fields every model of the family has
    read: Callable[[dict[str, Any]], dict[str, Any]]  # HF config -> the other ModelConfig fields
    write: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> HF config
    keys: frozenset[str]  # HF config keys `read` interprets (anything else must be harmless)
    tensors: Callable[[ModelConfig], list[Tensor]]
    check: Callable[[ModelConfig], list[str]] = lambda cfg: []  # constraints between fields
    zero: tuple[str, ...] = ()  # suffixes of slmkit buffers the family has no tensor for: they must stay zero
    # HF tensor name -> its row order, for a checkpoint with this config.json (DeepSeek's interleaved RoPE)
    row_orders: Callable[[ModelConfig, dict[str, Any]], dict[str, InterleavedRope]] = lambda cfg, hf: {}

    def blockers(self, cfg: ModelConfig) -> list[str]:
        """Why `cfg` cannot be written as this family (empty when it can)."""
        out = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in self.fixed.items() if getattr(cfg, k) != v]
        return out + self.check(cfg)

    def checkpoint_tensors(self, cfg: ModelConfig, hf_config: dict[str, Any]) -> list[Tensor]:
        """`tensors(cfg)` as laid out in a checkpoint whose config.json is `hf_config`."""
        orders = self.row_orders(cfg, hf_config)
        return [replace(t, rows=orders[t.hf]) if t.hf in orders else t for t in self.tensors(cfg)]


# ---------------------------------------------------------------------------------- config pieces
def _rope_read(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 `rope_parameters`, or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise InputError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise InputError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = None if kind == "default" else {"rope_type": kind, **params}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _rope_write(cfg: ModelConfig) -> dict[str, Any]:
    scaling = dict(cfg.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_theta, **scaling}}


def _window_read(hf: dict[str, Any], sliding_by_default: Callable[[int], bool] | None) -> dict[str, Any]:
    """Which layers use a sliding window: `layer_types` when given, else the family's rule
    (Qwen: layers from `max_window_layers` on, when `use_sliding_window`; Gemma 2: every other)."""
    window, n = hf.get("sliding_window"), hf["num_hidden_layers"]
    if window is None or hf.get("use_sliding_window") is False:
        return {"sliding_window": None, "sliding_window_layers": None}
    types = hf.get("layer_types")
    if types is not None:
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise InputError(f"layer types {sorted(unknown)} are not supported (sliding_attention, full_attention)")
        layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    elif "max_window_layers" in hf:
        layers = list(range(hf["max_window_layers"], n))
    else:
        layers = [i for i in range(n) if sliding_by_default is None or sliding_by_default(i)]
    if not layers:
        return {"sliding_window": None, "sliding_window_layers": None}
    return {"sliding_window": window, "sliding_window_layers": None if layers == list(range(n)) else layers}


def _window_write(cfg: ModelConfig) -> dict[str, Any]:
    sliding = [cfg.sliding_window is not None and (cfg.sliding_window_layers is None or i in cfg.sliding_window_layers)
               for i in range(cfg.n_layers)]
    return {
        "sliding_window": cfg.sliding_window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "use_sliding_window": cfg.sliding_window is not None,
        "max_window_layers": 0,
    }


def _decoder_read(hf: dict[str, Any], act_key: str = "hidden_act", acts: tuple[str, ...] = ("silu",)) -> dict[str, Any]:
    """The fields every Llama-shaped decoder has."""
    act = hf.get(act_key, hf.get("hidden_act"))
    if act not in acts:
        raise InputError(f"{act_key}={act!r} is not supported for {hf['model_type']} (supported: {', '.join(acts)})")
    return {
        "vocab_size": hf["vocab_size"],
        "context_length": hf["max_position_embeddings"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "ffn_hidden": hf["intermediate_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        **_rope_read(hf),
    }


def _decoder_write(cfg: ModelConfig, act_key: str = "hidden_act", act: str = "silu") -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        act_key: act,
        **_rope_write(cfg),
    }


DECODER_KEYS = frozenset({
    "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
    "rope_parameters", "rope_theta", "rope_scaling",
})
_DECODER_FIXED = {
    "norm": "rmsnorm", "norm_plus_one": False, "mlp": "swiglu", "pos": "rope", "causal": True, "embed_scale": False, "qk_norm": False,
    "logit_softcap": None, "attn_softcap": None, "attn_scale": None, "output_norms": False, "lm_head_bias": False,
    "attn_bias": False, "attn_out_bias": False, "mlp_bias": False, "sliding_window": None, "sliding_window_layers": None,
    "attention_kind": "mha", "ffn_kind": "dense", "rope_local_theta": None,
}


def _decoder_tensors(cfg: ModelConfig, rename: dict[str, str] | None = None, fuse: dict[str, tuple[str, ...]] | None = None,
                     router_bias: bool = False) -> list[Tensor]:
    """HF Llama layout (slmkit's names under `model.`), with per-layer renames and fused groups; MoE
    checkpoints store one tensor per expert, as slmkit does."""
    rename, fuse = rename or {}, fuse or {}
    fused_members = {member: hf for hf, members in fuse.items() for member in members}
    out = [Tensor("model.embed_tokens.weight", ("embed_tokens.weight",))]
    for i in range(cfg.n_layers):
        layer = []
        for name in _layer_names(cfg, i, router_bias):
            module, _, kind = name.rpartition(".")
            if module in fused_members:
                hf_module = fused_members[module]
                if fuse[hf_module][0] == module:  # the group is emitted once, at its first member
                    layer.append(Tensor(f"{hf_module}.{kind}", tuple(f"{m}.{kind}" for m in fuse[hf_module])))
            else:
                layer.append(Tensor(f"{rename.get(module, module)}.{kind}", (name,)))
        out += [Tensor(f"model.layers.{i}.{t.hf}", tuple(f"layers.{i}.{o}" for o in t.ours)) for t in layer]
    out.append(Tensor("model.norm.weight", ("norm.weight",)))
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head.weight",)))
    return out


def _is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.ffn_kind == "moe" and i >= cfg.first_k_dense


def _layer_names(cfg: ModelConfig, i: int, router_bias: bool = False) -> list[str]:
    """Parameter names inside block `i`, in module order (the router's selection bias only when
    the family stores it)."""
    names = ["input_layernorm.weight"]
    if cfg.attention_kind == "mla":
        query = ["q_a_proj", "q_a_layernorm", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"]
        names += [f"self_attn.{m}.weight" for m in (*query, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")]
    for proj in () if cfg.attention_kind == "mla" else ("q_proj", "k_proj", "v_proj", "o_proj"):
        names.append(f"self_attn.{proj}.weight")
        if cfg.attn_out_bias if proj == "o_proj" else cfg.attn_bias:
            names.append(f"self_attn.{proj}.bias")
    if cfg.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if cfg.output_norms:
        names.append("attn_output_norm.weight")
    names.append("post_attention_layernorm.weight")
    dense = "mlp" if not _is_moe_layer(cfg, i) else "mlp.shared_experts" if cfg.n_shared_experts else None
    for proj in ("gate_proj", "up_proj", "down_proj") if dense else ():
        names.append(f"{dense}.{proj}.weight")
        if cfg.mlp_bias:
            names.append(f"{dense}.{proj}.bias")
    if _is_moe_layer(cfg, i):
        names += ["mlp.gate.weight", *(["mlp.gate.e_score_correction_bias"] if router_bias else [])]
        names += [f"mlp.experts.{e}.{p}.weight" for e in range(cfg.n_experts) for p in ("gate_proj", "up_proj", "down_proj")]
    if cfg.output_norms:
        names.append("mlp_output_norm.weight")
    return names


def _mixtral_tensors(cfg: ModelConfig) -> list[Tensor]:
    """Mixtral's checkpoint names: `block_sparse_moe`, experts' w1 (gate), w2 (down), w3 (up)."""
    rename = {"mlp.gate": "block_sparse_moe.gate"}
    for e in range(cfg.n_experts):
        for ours, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            rename[f"mlp.experts.{e}.{ours}"] = f"block_sparse_moe.experts.{e}.{theirs}"
    return _decoder_tensors(cfg, rename=rename)


# ---------------------------------------------------------------------------------- families
def _llama_read(hf):
    bias = hf.get("attention_bias", False)
    return {**_decoder_read(hf), "attn_bias": bias, "attn_out_bias": bias, "mlp_bias": hf.get("mlp_bias", False)}


def _llama_write(cfg):
    return {**_decoder_write(cfg), "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias}


def _mistral_read(hf):
    return {**_decoder_read(hf), **_window_read(hf, None)}


def _mistral_write(cfg):
    window = {"sliding_window": cfg.sliding_window}
    return {**_decoder_write(cfg), **window}


def _qwen2_read(hf):
    return {**_decoder_read(hf), **_window_read(hf, None)}


def _qwen2_write(cfg):
    return {**_decoder_write(cfg), **_window_write(cfg)}


def _qwen3_read(hf):
    bias = hf.get("attention_bias", False)
    return {**_decoder_read(hf), **_window_read(hf, None), "attn_bias": bias, "attn_out_bias": bias}


def _qwen3_write(cfg):
    return {**_qwen2_write(cfg), "attention_bias": cfg.attn_bias}


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def _gemma_read(hf):
    bias = hf.get("attention_bias", False)
    if hf.get("use_bidirectional_attention"):
        raise InputError("use_bidirectional_attention=true (an embedding model, not a causal LM) is not supported")
    return {**_decoder_read(hf, "hidden_activation", _GELU_TANH), "attn_bias": bias, "attn_out_bias": bias,
            "tie_embeddings": hf.get("tie_word_embeddings", True)}


def _gemma_write(cfg):
    return {**_decoder_write(cfg, "hidden_activation", "gelu_pytorch_tanh"), "attention_bias": cfg.attn_bias}


def _gemma2_read(hf):
    scalar = hf.get("query_pre_attn_scalar", hf["head_dim"])
    return {
        **_gemma_read(hf),
        **_window_read(hf, lambda i: i % 2 == 0),
        "attn_scale": scalar ** -0.5,
        "attn_softcap": hf.get("attn_logit_softcapping"),
        "logit_softcap": hf.get("final_logit_softcapping"),
    }


def _gemma2_write(cfg):
    scale = cfg.attn_scale or cfg.head_dim ** -0.5
    return {
        **_gemma_write(cfg),
        **_window_write(cfg),
        "query_pre_attn_scalar": _integral(scale ** -2),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.logit_softcap,
    }


def _gemma3_read(hf):
    """Gemma 2's layout plus QK-norm, five sliding-window layers to each global one, and two RoPE
    bases: the global layers' `rope_theta` (with any scaling), the local layers' own, unscaled.
    `attn_logit_softcapping` is read and left off: Gemma 3 (transformers, llama.cpp) does not apply it."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one set of RoPE parameters per layer type
        rope = _rope_read({"rope_parameters": params["full_attention"]})
        local = dict(params.get("sliding_attention") or {"rope_theta": 10000.0})
    else:
        rope = _rope_read({"rope_theta": hf.get("rope_theta", 1e6), "rope_scaling": hf.get("rope_scaling")})
        local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    kind = local.pop("rope_type", local.pop("type", "default"))
    if kind != "default" or set(local) - {"rope_theta"}:
        raise InputError(f"gemma3 with {kind!r} RoPE on its sliding-window layers is not supported (only 'default')")
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))  # used when layer_types is absent
    return {**_gemma2_read(hf), **_window_read(hf, lambda i: (i + 1) % pattern != 0), **rope,
            "rope_local_theta": float(local.get("rope_theta", 10000.0)), "attn_softcap": None}


def _gemma3_write(cfg):
    full = _rope_write(cfg)["rope_parameters"]
    local = full if cfg.rope_local_theta is None else {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
    return {**_gemma2_write(cfg), "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "attn_logit_softcapping": None}


def _integral(x: float) -> int | float:
    """An int when `x` is one up to rounding (HF validates query_pre_attn_scalar as an int)."""
    return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def _phi3_read(hf):
    return {**_decoder_read(hf), **_window_read(hf, None)}


def _phi3_write(cfg):
    return {**_decoder_write(cfg), "sliding_window": cfg.sliding_window}


def _mixtral_read(hf):
    width = hf["intermediate_size"]  # every layer is MoE: this is one expert's width
    return {**_mistral_read(hf), "ffn_hidden": width, "moe_ffn_hidden": width, "n_experts": hf["num_local_experts"],
            "n_experts_per_tok": hf["num_experts_per_tok"], "aux_loss_coef": hf.get("router_aux_loss_coef", 0.0)}


def _mixtral_write(cfg):
    return {**_mistral_write(cfg), "intermediate_size": cfg.moe_ffn_hidden, "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_per_tok, "router_aux_loss_coef": cfg.aux_loss_coef}


def _qwen3_moe_read(hf):
    """Dense layers are `mlp_only_layers`, and layers not on `decoder_sparse_step`; slmkit expresses
    the first k layers dense (DeepSeek's first_k_dense), so other patterns are refused."""
    n, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), sorted(hf.get("mlp_only_layers") or [])
    if step != 1 or dense != list(range(len(dense))):
        raise InputError(f"qwen3_moe with dense layers {dense} and decoder_sparse_step={step} is not supported "
                         "(only the first k layers dense, decoder_sparse_step=1)")
    if len(dense) >= n:
        raise InputError("qwen3_moe with every layer in mlp_only_layers has no experts; import it as qwen3")
    return {**_qwen3_read(hf), "moe_ffn_hidden": hf["moe_intermediate_size"], "n_experts": hf.get("num_local_experts") or hf["num_experts"],
            "n_experts_per_tok": hf["num_experts_per_tok"], "norm_topk_prob": hf.get("norm_topk_prob", True),
            "first_k_dense": len(dense), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.0)}


def _qwen3_moe_write(cfg):
    return {**_qwen3_write(cfg), "moe_intermediate_size": cfg.moe_ffn_hidden, "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.first_k_dense)), "router_aux_loss_coef": cfg.aux_loss_coef}


# DeepSeek-V3 config keys whose other values change the math; each is refused unless it has this value.
_DEEPSEEK_ONLY = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "attention_bias": False}


def _deepseek_v3_read(hf):
    for key, value in _DEEPSEEK_ONLY.items():
        if hf.get(key, value) != value:
            raise InputError(f"deepseek_v3 with {key}={hf[key]!r} is not supported (only {value!r})")
    if not hf.get("n_shared_experts"):
        raise InputError("deepseek_v3 without shared experts (n_shared_experts=0) is not supported")
    return {
        **_decoder_read(hf),
        "q_lora_rank": hf.get("q_lora_rank"), "kv_lora_rank": hf["kv_lora_rank"], "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "qk_rope_head_dim": hf["qk_rope_head_dim"], "v_head_dim": hf["v_head_dim"],
        "moe_ffn_hidden": hf["moe_intermediate_size"], "n_experts": hf["n_routed_experts"],
        "n_experts_per_tok": hf["num_experts_per_tok"], "n_shared_experts": hf["n_shared_experts"],
        "first_k_dense": hf.get("first_k_dense_replace", 0), "n_expert_groups": hf.get("n_group", 1),
        "topk_groups": hf.get("topk_group", 1), "routed_scaling": hf.get("routed_scaling_factor", 1.0),
        "norm_topk_prob": hf.get("norm_topk_prob", True),
    }


def _deepseek_v3_write(cfg):
    """Multi-token prediction modules are not written: transformers' DeepSeek-V3 does not run them."""
    return {
        **_decoder_write(cfg), "num_key_value_heads": cfg.n_heads, "head_dim": cfg.qk_rope_head_dim,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "rope_interleave": True,
        "moe_intermediate_size": cfg.moe_ffn_hidden, "n_routed_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_per_tok, "n_shared_experts": cfg.n_shared_experts,
        "first_k_dense_replace": cfg.first_k_dense, "n_group": cfg.n_expert_groups, "topk_group": cfg.topk_groups,
        "routed_scaling_factor": cfg.routed_scaling, "norm_topk_prob": cfg.norm_topk_prob, "num_nextn_predict_layers": 0,
    }


def _deepseek_v3_row_orders(cfg: ModelConfig, hf: dict[str, Any]) -> dict[str, InterleavedRope]:
    """DeepSeek checkpoints keep the RoPE dims of each query head and of the shared key as adjacent
    pairs (`rope_interleave`, true unless the config says otherwise, as transformers reads it)."""
    if not hf.get("rope_interleave", True):
        return {}
    rope, query = cfg.qk_rope_head_dim, "q_b_proj" if cfg.q_lora_rank else "q_proj"
    out = {}
    for i in range(cfg.n_layers):
        out[f"model.layers.{i}.self_attn.{query}.weight"] = InterleavedRope(cfg.qk_nope_head_dim + rope, rope)
        out[f"model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight"] = InterleavedRope(cfg.kv_lora_rank + rope, rope)
    return out


def _deepseek_v3_check(cfg: ModelConfig) -> list[str]:
    return [] if cfg.n_shared_experts else ["n_shared_experts=0 (needs >= 1)"]


def _gpt2_read(hf):
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if act not in acts:
        raise InputError(f"activation_function={act!r} is not supported for gpt2 (supported: {', '.join(acts)})")
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if hf.get(key, value) != value:
            raise InputError(f"{key}={hf[key]!r} is not supported for gpt2 (only {value!r})")
    return {
        "vocab_size": hf["vocab_size"],
        "context_length": hf["n_positions"],
        "d_model": hf["n_embd"],
        "n_layers": hf["n_layer"],
        "n_heads": hf["n_head"],
        "ffn_hidden": hf.get("n_inner") or 4 * hf["n_embd"],
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "mlp": acts[act],
        "tie_embeddings": hf.get("tie_word_embeddings", True),
    }


def _gpt2_write(cfg):
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_hidden,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _gpt2_tensors(cfg: ModelConfig) -> list[Tensor]:
    out = [
        Tensor("transformer.wte.weight", ("embed_tokens.weight",)),
        Tensor("transformer.wpe.weight", ("pos.wpe.weight",)),
    ]
    for i in range(cfg.n_layers):
        h, o = f"transformer.h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            t = kind == "weight"
            out += [
                Tensor(f"{h}ln_1.{kind}", (f"{o}input_layernorm.{kind}",)),
                Tensor(f"{h}attn.c_attn.{kind}", tuple(f"{o}self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")), t),
                Tensor(f"{h}attn.c_proj.{kind}", (f"{o}self_attn.o_proj.{kind}",), t),
                Tensor(f"{h}ln_2.{kind}", (f"{o}post_attention_layernorm.{kind}",)),
                Tensor(f"{h}mlp.c_fc.{kind}", (f"{o}mlp.up_proj.{kind}",), t),
                Tensor(f"{h}mlp.c_proj.{kind}", (f"{o}mlp.down_proj.{kind}",), t),
            ]
    out += [Tensor("transformer.ln_f.weight", ("norm.weight",)), Tensor("transformer.ln_f.bias", ("norm.bias",))]
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", ("lm_head.weight",)))
    return out


_GEMMA2_NORMS = {
    "attn_output_norm": "post_attention_layernorm",
    "post_attention_layernorm": "pre_feedforward_layernorm",
    "mlp_output_norm": "post_feedforward_layernorm",
}
_PHI3_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_SLIDING = ("sliding_window", "sliding_window_layers")
_ATTN_BIAS = ("attn_bias", "attn_out_bias")


# Routing every MoE family without DeepSeek's extras has: plain top-k over all experts, no shared
# experts, no capacity limit, and no selection bias (so no auxiliary-loss-free balancing to train it).
_ROUTED = {"ffn_kind": "moe", "n_shared_experts": 0, "routed_scaling": 1.0, "n_expert_groups": 1, "topk_groups": 1,
           "capacity_factor": None, "router_bias_rate": 0.0}
_ROUTER_BIAS = ("e_score_correction_bias",)
# Keys that only matter in training (router logits returned, the aux loss weight, routing noise).
_ROUTER_TRAINING_KEYS = ("output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "aux_loss_alpha", "seq_aux")


def _fixed(drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """The Llama-shaped decoder's fixed fields, with some changed and some left to the HF config."""
    return {k: v for k, v in {**_DECODER_FIXED, **changes}.items() if k not in drop}


def _same_attn_bias(cfg: ModelConfig) -> list[str]:
    if cfg.attn_bias == cfg.attn_out_bias:
        return []
    return [f"attn_out_bias={cfg.attn_out_bias!r} differs from attn_bias={cfg.attn_bias!r}"]


def _gpt2_check(cfg: ModelConfig) -> list[str]:
    out = [] if cfg.n_kv_heads == cfg.n_heads else [f"n_kv_heads={cfg.n_kv_heads} (needs n_heads={cfg.n_heads})"]
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        out.append(f"head_dim={cfg.head_dim} (needs d_model / n_heads = {cfg.d_model // cfg.n_heads})")
    if cfg.mlp not in ("gelu", "gelu_tanh"):
        out.append(f"mlp={cfg.mlp!r} (needs 'gelu_tanh' or 'gelu')")
    return out


_GEMMA_KEYS = DECODER_KEYS | {"attention_bias", "hidden_activation"}
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt2", "GPT2LMHeadModel",
           _fixed(drop=("mlp",), norm="layernorm", norm_bias=True, pos="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True),
           _gpt2_read, _gpt2_write,
           frozenset({"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
                      "activation_function", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                      "add_cross_attention"}),
           _gpt2_tensors, _gpt2_check),
    Family("llama", "LlamaForCausalLM", _fixed(drop=(*_ATTN_BIAS, "mlp_bias")), _llama_read, _llama_write,
           DECODER_KEYS | {"attention_bias", "mlp_bias"}, _decoder_tensors, _same_attn_bias),
    Family("qwen2", "Qwen2ForCausalLM", _fixed(drop=_SLIDING, attn_bias=True), _qwen2_read, _qwen2_write,
           DECODER_KEYS | {"sliding_window"}, _decoder_tensors),
    Family("qwen3", "Qwen3ForCausalLM", _fixed(drop=(*_SLIDING, *_ATTN_BIAS), qk_norm=True), _qwen3_read, _qwen3_write,
           DECODER_KEYS | {"sliding_window", "attention_bias"}, _decoder_tensors, _same_attn_bias),
    Family("mistral", "MistralForCausalLM", _fixed(drop=("sliding_window",)), _mistral_read, _mistral_write,
           DECODER_KEYS | {"sliding_window"}, _decoder_tensors),
    Family("gemma", "GemmaForCausalLM", _fixed(drop=_ATTN_BIAS, norm_plus_one=True, embed_scale=True, mlp="geglu"),
           _gemma_read, _gemma_write, _GEMMA_KEYS, _decoder_tensors, _same_attn_bias),
    Family("gemma2", "Gemma2ForCausalLM",
           _fixed(drop=(*_ATTN_BIAS, *_SLIDING, "attn_scale", "attn_softcap", "logit_softcap"),
                  norm_plus_one=True, embed_scale=True, mlp="geglu", output_norms=True),
           _gemma2_read, _gemma2_write,
           _GEMMA_KEYS | {"sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"},
           lambda cfg: _decoder_tensors(cfg, rename=_GEMMA2_NORMS), _same_attn_bias),
    Family("gemma3_text", "Gemma3ForCausalLM",
           _fixed(drop=(*_ATTN_BIAS, *_SLIDING, "attn_scale", "logit_softcap", "rope_local_theta"),
                  norm_plus_one=True, embed_scale=True, mlp="geglu", output_norms=True, qk_norm=True),
           _gemma3_read, _gemma3_write,
           _GEMMA_KEYS | {"sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                          "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
           lambda cfg: _decoder_tensors(cfg, rename=_GEMMA2_NORMS), _same_attn_bias),
    Family("mixtral", "MixtralForCausalLM", _fixed(drop=("sliding_window",), **_ROUTED, router_score="softmax", norm_topk_prob=True,
                  first_k_dense=0),
           _mixtral_read, _mixtral_write,
           DECODER_KEYS | {"sliding_window", "num_local_experts", "num_experts_per_tok", *_ROUTER_TRAINING_KEYS},
           _mixtral_tensors, zero=_ROUTER_BIAS),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", _fixed(drop=(*_SLIDING, *_ATTN_BIAS), qk_norm=True, **_ROUTED, router_score="softmax"),
           _qwen3_moe_read, _qwen3_moe_write,
           DECODER_KEYS | {"sliding_window", "attention_bias", "moe_intermediate_size", "num_local_experts", "num_experts",
                           "num_experts_per_tok", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                           *_ROUTER_TRAINING_KEYS},
           _decoder_tensors, _same_attn_bias, zero=_ROUTER_BIAS),
    Family("deepseek_v3", "DeepseekV3ForCausalLM",
           _fixed(attention_kind="mla", ffn_kind="moe", router_score="sigmoid", capacity_factor=None),
           _deepseek_v3_read, _deepseek_v3_write,
           DECODER_KEYS | set(_DEEPSEEK_ONLY) | {
               "rope_interleave", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_head_dim",
               "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
               "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
               "num_nextn_predict_layers", *_ROUTER_TRAINING_KEYS},
           lambda cfg: _decoder_tensors(cfg, router_bias=True), _deepseek_v3_check, row_orders=_deepseek_v3_row_orders),
    Family("phi3", "Phi3ForCausalLM", _fixed(drop=_SLIDING), _phi3_read, _phi3_write,
           DECODER_KEYS | {"sliding_window"}, lambda cfg: _decoder_tensors(cfg, fuse=_PHI3_FUSED)),
)}


def family_of(hf_config: dict[str, Any]) -> Family:
    """The family of an HF config.json, or an error listing the supported ones."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        archs = ", ".join(hf_config.get("architectures") or []) or "none given"
        raise InputError(
            f"unsupported architecture: model_type {model_type!r} (architectures: {archs}); "
            f"supported: {', '.join(f'{f.name} ({f.architecture})' for f in FAMILIES.values())}"
        )
    return FAMILIES[model_type]


def family_for(cfg: ModelConfig) -> Family:
    """The first family that can express `cfg`, or an error naming the fields that prevent each."""
    reasons = {}
    for fam in FAMILIES.values():
        blockers = fam.blockers(cfg)
        if not blockers:
            return fam
        reasons[fam.name] = blockers
    best = min(reasons, key=lambda name: len(reasons[name]))
    raise InputError(f"this model has no Hugging Face equivalent; closest is {best}, which needs: {'; '.join(reasons[best])}")
