"""Parity with transformers' DeepSeek-V3 (MLA + MoE with shared experts and group-limited sigmoid
routing), Mixtral and Qwen3-MoE: the same weights give the same logits at fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from slmkit.config import ModelConfig
from slmkit.model import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def moe_weights(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names under `model.`, except the experts: transformers stores them fused as 3-D tensors
    (gate_up_proj [E, 2I, d], down_proj [E, d, I]), slmkit one module per expert."""
    out = {}
    for name, w in hf_state.items():
        name = name.removeprefix("model.")
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(zip(*w.chunk(2, dim=1))):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(w):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = w
    return out


def randomize(model: torch.nn.Module) -> None:
    """Norms away from one, router biases away from zero, so every term is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(mean=1.0, std=0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.05)


def compare(cfg: ModelConfig, hf: torch.nn.Module) -> None:
    randomize(hf)
    ours = Transformer(cfg).eval()
    missing, unexpected = ours.load_state_dict(moe_weights(hf.state_dict()), strict=False)
    assert not unexpected, unexpected
    assert all(name.endswith("e_score_correction_bias") for name in missing), missing  # zero: Mixtral, Qwen3
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        assert_close(ours(ids), expected, TOL)
        absorbed = Transformer(cfg.replace(mla_absorb=True)).eval()
        absorbed.load_state_dict(ours.state_dict())
        assert_close(absorbed(ids), expected, TOL)


@pytest.mark.parametrize("q_lora_rank", [None, 24], ids=["q-full", "q-lora"])
def test_deepseek_v3_logits_match_transformers(q_lora_rank: int | None) -> None:
    cfg = ModelConfig.from_preset(
        "deepseek-tiny", vocab_size=151, context_length=64, d_model=64, n_layers=3, n_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, ffn_hidden=96, moe_ffn_hidden=32,
        n_experts=8, n_experts_per_tok=3, n_shared_experts=2, first_k_dense=1, n_expert_groups=4, topk_groups=2,
        routed_scaling=2.5, mtp_depth=0, rope_theta=500.0)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        moe_intermediate_size=cfg.moe_ffn_hidden, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_experts,
        routed_scaling_factor=cfg.routed_scaling, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_expert_groups, topk_group=cfg.topk_groups, num_experts_per_tok=cfg.n_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=True, max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=False, tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    compare(cfg, transformers.DeepseekV3ForCausalLM(hf_cfg).eval())


def test_mixtral_logits_match_transformers() -> None:
    cfg = ModelConfig.from_preset("mixtral-tiny", vocab_size=151, context_length=64, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, ffn_hidden=48, n_experts=4, n_experts_per_tok=2, rope_theta=500.0)
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.moe_ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_tok, max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    compare(cfg, transformers.MixtralForCausalLM(hf_cfg).eval())


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_logits_match_transformers(norm_topk_prob: bool) -> None:
    cfg = ModelConfig.from_preset("qwen3-moe-tiny", vocab_size=151, context_length=64, d_model=64, n_layers=2, n_heads=4,
                                  n_kv_heads=2, head_dim=24, moe_ffn_hidden=32, n_experts=8, n_experts_per_tok=3,
                                  norm_topk_prob=norm_topk_prob, rope_theta=500.0)
    hf_cfg = transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, moe_intermediate_size=cfg.moe_ffn_hidden,
        intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.n_experts_per_tok, norm_topk_prob=norm_topk_prob, max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    compare(cfg, transformers.Qwen3MoeForCausalLM(hf_cfg).eval())
