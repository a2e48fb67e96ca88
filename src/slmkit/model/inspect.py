"""What a model costs, computed from its `ModelConfig` alone: parameters, FLOPs, KV cache, memory.

Everything here is arithmetic on the config, so it works for models far too large to build;
a test holds the parameter count equal to `Transformer(cfg).num_parameters()`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmkit.config import PRESETS, REAL_SIZES, ModelConfig
from slmkit.errors import InputError

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
KV_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8")
WEIGHT_PRECISIONS = ("fp32", "bf16", "int8", "int4")


@dataclass
class ParamCount:
    total: int  # tied weights counted once
    embedding: int  # token (+ learned position) embeddings
    non_embedding: int  # total - embedding (an untied lm_head counts here)
    matmul: int  # weights that enter a matmul: all linear layers incl. lm_head, every expert and router
    active: int = 0  # parameters one token uses in the main model: chosen experts only, MTP modules left out
    active_matmul: int = 0  # matmul weights one token multiplies (the FLOPs count)
    mtp: int = 0  # parameters of the multi-token prediction modules (in total, not in active)


def _attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matmul weights, other parameters: biases and norms) of one attention layer."""
    d = cfg.d_model
    if cfg.attention_kind == "mla":
        h, qk, r, rope = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        q_w = d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk if cfg.q_lora_rank else d * h * qk
        weights = q_w + d * (r + rope) + r * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
        q_lora = cfg.q_lora_rank or 0
        other = r + q_lora + ((q_lora + r + rope + d) if cfg.attn_bias else 0)
        return weights, other
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    other = ((q_dim + 2 * kv_dim + d) if cfg.attn_bias else 0) + (2 * cfg.head_dim if cfg.qk_norm else 0)
    return d * q_dim + 2 * d * kv_dim + q_dim * d, other


def _mlp_params(cfg: ModelConfig, hidden: int) -> tuple[int, int]:
    """(matmul weights, biases) of one MLP of width `hidden`."""
    gated = cfg.mlp in ("swiglu", "geglu")
    return (3 if gated else 2) * cfg.d_model * hidden, ((2 if gated else 1) * hidden + cfg.d_model) if cfg.mlp_bias else 0


def _ffn_params(cfg: ModelConfig, layer: int) -> tuple[int, int, int]:
    """(matmul weights, active matmul weights, biases) of layer `layer`'s feed-forward."""
    if cfg.ffn_kind != "moe" or layer < cfg.first_k_dense:
        w, b = _mlp_params(cfg, cfg.ffn_hidden)
        return w, w, b
    expert_w, expert_b = _mlp_params(cfg, cfg.moe_ffn_hidden)
    shared_w, shared_b = _mlp_params(cfg, cfg.moe_ffn_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else (0, 0)
    router = cfg.n_experts * cfg.d_model
    total = cfg.n_experts * expert_w + shared_w + router
    active = cfg.n_experts_per_tok * expert_w + shared_w + router
    return total, active, cfg.n_experts * expert_b + shared_b


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Parameters of `Transformer(cfg)`, counted analytically."""
    d = cfg.d_model
    norm = d * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)
    attn_w, attn_other = _attention_params(cfg)

    def layer(index: int) -> tuple[int, int, int]:  # (params, matmul, active matmul)
        ffn_w, ffn_active, ffn_b = _ffn_params(cfg, index)
        return 2 * norm + attn_w + attn_other + ffn_w + ffn_b, attn_w + ffn_w, attn_w + ffn_active

    layers = [layer(i) for i in range(cfg.n_layers)]
    mtp_layers = [layer(cfg.n_layers + k) for k in range(cfg.mtp_depth)]
    mtp = sum(p + 3 * norm + 2 * d * d for p, _, _ in mtp_layers)  # + enorm, hnorm, norm, eh_proj
    embedding = cfg.vocab_size * d + (cfg.context_length * d if cfg.pos == "learned" else 0)
    head = (0 if cfg.tie_embeddings else cfg.vocab_size * d) + (cfg.vocab_size if cfg.lm_head_bias else 0)
    total = embedding + sum(p for p, _, _ in layers) + norm + head + mtp
    matmul = sum(m for _, m, _ in layers) + sum(m + 2 * d * d for _, m, _ in mtp_layers) + cfg.vocab_size * d
    active_matmul = sum(a for _, _, a in layers) + cfg.vocab_size * d
    inactive = sum(m - a for _, m, a in layers)
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding, matmul=matmul,
                      active=total - mtp - inactive, active_matmul=active_matmul, mtp=mtp)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token at sequence length T (one multiply-add = 2 FLOPs):

        2 * matmul_params  +  attention

    matmul_params are the weights of every linear layer a token passes through (for MoE: the router,
    the chosen and the shared experts; MTP modules left out), lm_head included (it is a matmul even when
    tied to the embedding); embedding lookups, norms, activations and softmax are left out.
    Attention: q.k^T and probs.v each cost 2 * d_attn FLOPs per (query, key) pair per layer, with
    d_attn = n_heads * head_dim. A causal query sees (T + 1) / 2 keys on average, giving
    2 * n_layers * (T + 1) * d_attn (~ Kaplan et al.'s 2 * n_layers * n_ctx * d_attn);
    a bidirectional one sees T, giving twice that.
    Training costs 3x forward (backward = 2x forward).
    """
    d_attn = cfg.n_heads * cfg.head_dim
    keys_x2 = (seq_len + 1) if cfg.causal else 2 * seq_len  # 2 x average keys per query
    return 2 * count_parameters(cfg).active_matmul + 2 * cfg.n_layers * keys_x2 * d_attn


def kv_cache_bytes_per_token(cfg: ModelConfig, precision: str) -> float:
    """Keys and values of every layer: 2 * n_layers * n_kv_heads * head_dim elements per token;
    MLA caches n_layers * (kv_lora_rank + qk_rope_head_dim) (int8/fp8 leave out the small scales)."""
    if cfg.attention_kind == "mla":
        return cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * BYTES[precision]
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * BYTES[precision]


GQA_GROUP = 8  # the GQA peer: 8 query heads per KV head (Llama-3 70B, Mixtral, Qwen3-30B-A3B use 8:1 or more)


def kv_cache_comparison(cfg: ModelConfig) -> dict[str, float]:
    """KV-cache elements per token of this model against an MHA (n_layers * 2 * d_model) and a GQA
    (1/8 of that) model of the same width and depth, as compression ratios (peer / this)."""
    own = kv_cache_bytes_per_token(cfg, "fp32") / 4
    mha = 2 * cfg.n_layers * cfg.d_model
    return {"elements": own, "mha_elements": mha, "vs_mha": mha / own, "vs_gqa": mha / GQA_GROUP / own}


def activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, bytes_per_element: float) -> float:
    """Activations kept for the backward pass, roughly: per layer and token the norm inputs and
    outputs (4d), q, k, v and the attention output (2 * d_q + 2 * d_kv; SDPA keeps no T x T
    matrix), and the MLP's hidden tensors (4f gated: gate, up, act, product; 2f plain);
    plus the logits and their log-softmax (2 * vocab) per token. Dropout masks, rope temporaries
    and allocator slack are left out, so treat it as a lower bound."""
    d, f = cfg.d_model, cfg.ffn_hidden
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = 4 * d + 2 * q_dim + 2 * kv_dim + (4 if cfg.mlp in ("swiglu", "geglu") else 2) * f
    per_token = cfg.n_layers * per_layer + 2 * cfg.vocab_size
    return batch_size * seq_len * per_token * bytes_per_element


def inspect_config(cfg: ModelConfig, batch_size: int = 1, seq_len: int | None = None) -> dict[str, Any]:
    """Parameters, FLOPs, KV cache and memory estimates as one JSON-serializable dict.

    Training memory (fp32 master weights, AdamW): weights 4N + grads 4N + two fp32 moments 8N
    = 16N bytes, plus `activation_bytes` at 4 bytes/element (fp32) or 2 (bf16 autocast).
    Inference: weights at each precision plus the KV cache for `batch_size` x `seq_len` tokens;
    weight-only int8/int4 keep the KV cache at bf16. Activations of inference are left out.
    """
    seq_len = seq_len or cfg.context_length
    if seq_len < 1 or batch_size < 1:
        raise InputError("--batch-size and --seq-len must be positive")
    if seq_len > cfg.context_length:
        raise InputError(f"--seq-len {seq_len} is longer than the model's context length {cfg.context_length}")
    params = count_parameters(cfg)
    n = params.total
    forward = forward_flops_per_token(cfg, seq_len)
    tokens = batch_size * seq_len
    states = {"weights": 4 * n, "grads": 4 * n, "adamw_moments": 8 * n}
    training = {
        precision: {**states, "activations": act, "total": sum(states.values()) + act}
        for precision, act in (("fp32", activation_bytes(cfg, batch_size, seq_len, 4)),
                               ("bf16_autocast", activation_bytes(cfg, batch_size, seq_len, 2)))
    }
    inference = {}
    for precision in WEIGHT_PRECISIONS:
        kv_precision = precision if precision in ("fp32", "bf16") else "bf16"
        weights = n * BYTES[precision]
        kv = tokens * kv_cache_bytes_per_token(cfg, kv_precision)
        inference[precision] = {"weights": weights, "kv_cache": kv, "kv_precision": kv_precision, "total": weights + kv}
    return {
        "config": cfg.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "parameters": asdict(params),
        "flops_per_token": {"forward": forward, "training": 3 * forward},
        "kv_cache_bytes_per_token": {p: kv_cache_bytes_per_token(cfg, p) for p in KV_PRECISIONS},
        "kv_cache_vs_peers": kv_cache_comparison(cfg),
        "memory_bytes": {"training": training, "inference": inference},
    }


def logged_utilization(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last per-layer MoE expert utilization that training logged for a model directory: from
    metrics.jsonl beside it (a run directory's final/ or checkpoints/step-N/), else None."""
    path = Path(model_dir)
    for run in (path, path.parent, path.parent.parent):
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
            logged = [r for r in records if "moe_max_mean" in r]
            if logged:
                last = logged[-1]
                return {"step": last["step"], **{k: last[k] for k in last if k.startswith("moe_")}}
    return None


def resolve_config(name_or_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name or a model directory (or its config.json), with `--set` overrides applied."""
    overrides = overrides or {}
    path = Path(name_or_dir)
    if str(name_or_dir) in PRESETS or str(name_or_dir) in REAL_SIZES:
        return ModelConfig.from_preset(str(name_or_dir), **overrides)
    if path.is_dir() or path.is_file():
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"{name_or_dir} is neither a preset nor a model directory (no config.json)")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
        values.pop("quantization", None)  # a quantized model: the estimates are for its architecture
        return ModelConfig.from_dict({**values, **overrides})
    return ModelConfig.from_preset(str(name_or_dir), **overrides)  # raises "unknown preset ... did you mean"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(info: dict[str, Any]) -> str:
    """The dict of `inspect_config` as aligned text."""
    p, fl = info["parameters"], info["flops_per_token"]
    b, t = info["batch_size"], info["seq_len"]
    lines = [
        "parameters",
        f"  total           {p['total']:>16,}",
        f"  embedding       {p['embedding']:>16,}",
        f"  non-embedding   {p['non_embedding']:>16,}",
        f"  matmul          {p['matmul']:>16,}  (linear layers incl. lm_head)",
        f"  active          {p['active']:>16,}  (used per token: chosen experts; MTP modules excluded)",
        *([f"  mtp modules     {p['mtp']:>16,}"] if p["mtp"] else []),
        f"FLOPs per token at seq_len {t}",
        f"  forward         {fl['forward']:>16,}",
        f"  training        {fl['training']:>16,}  (3x forward)",
        "KV cache per token",
        *(f"  {k:<15} {_size(v):>16}" for k, v in info["kv_cache_bytes_per_token"].items()),
        (f"  vs MHA          {info['kv_cache_vs_peers']['vs_mha']:>15.2f}x  smaller than MHA of the same width "
         f"(GQA 8:1: {info['kv_cache_vs_peers']['vs_gqa']:.2f}x)"),
        f"training memory at batch {b} x seq {t} (AdamW)",
        f"  {'':<15} {'weights':>11} {'grads':>11} {'adamw':>11} {'activations':>12} {'total':>11}",
    ]
    for name, m in info["memory_bytes"]["training"].items():
        lines.append(f"  {name:<15} {_size(m['weights']):>11} {_size(m['grads']):>11} {_size(m['adamw_moments']):>11} "
                     f"{_size(m['activations']):>12} {_size(m['total']):>11}")
    lines += [f"inference memory at batch {b} x seq {t}",
              f"  {'precision':<15} {'weights':>11} {'kv cache':>11} {'total':>11}"]
    for name, m in info["memory_bytes"]["inference"].items():
        lines.append(f"  {name:<15} {_size(m['weights']):>11} {_size(m['kv_cache']):>11} {_size(m['total']):>11}"
                     f"  (kv {m['kv_precision']})")
    util = info.get("expert_utilization")
    if util:
        lines.append(f"expert utilization logged at step {util['step']} (per MoE layer)")
        for key in ("moe_max_mean", "moe_entropy", "moe_dropped"):
            if key in util:
                lines.append(f"  {key.removeprefix('moe_'):<15} " + " ".join(f"{v:.3g}" for v in util[key]))
    return "\n".join(lines)
