"""Parity with Hugging Face transformers: the same weights give the same logits (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from slmkit.config import ModelConfig
from slmkit.model import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def llama_weights(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama names are slmkit's, under a `model.` prefix (lm_head excepted)."""
    return {name.removeprefix("model."): w for name, w in hf_state.items()}


def gpt2_weights(hf_state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """GPT-2 Conv1D stores weights as [in, out] (transpose them) and fuses q, k, v in c_attn."""
    out = {
        "embed_tokens.weight": hf_state["transformer.wte.weight"],
        "pos.wpe.weight": hf_state["transformer.wpe.weight"],
        "norm.weight": hf_state["transformer.ln_f.weight"],
        "norm.bias": hf_state["transformer.ln_f.bias"],
    }
    for i in range(n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"input_layernorm.{kind}"] = hf_state[src + f"ln_1.{kind}"]
            out[dst + f"post_attention_layernorm.{kind}"] = hf_state[src + f"ln_2.{kind}"]
        q, k, v = hf_state[src + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qb, kb, vb = hf_state[src + "attn.c_attn.bias"].chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = w, b
        for hf_name, name in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            out[dst + f"{name}.weight"] = hf_state[src + f"{hf_name}.weight"].t()
            out[dst + f"{name}.bias"] = hf_state[src + f"{hf_name}.bias"]
    return out


def load_into(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_embeddings), missing
    return model


def random_ids(vocab: int, b: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))


def randomize_norms(model: torch.nn.Module) -> None:
    """HF initializes norms to ones/zeros; random values make the comparison meaningful."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)


LLAMA_CASES = {
    "gqa-tied": dict(n_kv_heads=2, tie_embeddings=True, rope_scaling=None),
    "mha-untied": dict(n_kv_heads=4, tie_embeddings=False, rope_scaling=None),
    "mqa-bias": dict(n_kv_heads=1, tie_embeddings=False, rope_scaling=None, attn_bias=True, mlp_bias=True),
    "llama3-rope": dict(n_kv_heads=2, tie_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "linear-rope": dict(n_kv_heads=2, tie_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_match_transformers(case: str) -> None:
    opts = LLAMA_CASES[case]
    cfg = ModelConfig(vocab_size=211, context_length=64, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96,
                      norm="rmsnorm", mlp="swiglu", pos="rope", rope_theta=500.0, norm_eps=1e-6, **opts)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(cfg.rope_scaling)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias,
        initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    randomize_norms(hf)
    ours = load_into(cfg, llama_weights(hf.state_dict()))
    ids = random_ids(cfg.vocab_size)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding in the second row
    with torch.no_grad():
        expected = hf(ids).logits
        assert_close(ours(ids), expected, TOL)
        expected_padded = hf(ids, attention_mask=mask).logits
        got_padded = ours(ids, attention_mask=mask)
    # HF gives padded rows unshifted positions unless position_ids are passed; compare the unpadded row
    # and the padded row's real tokens against HF with explicit position ids.
    assert_close(got_padded[0], expected_padded[0], TOL)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected_padded = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert_close(got_padded[1, 7:], expected_padded[1, 7:], TOL)


def test_gpt2_logits_match_transformers() -> None:
    cfg = ModelConfig.from_preset("gpt2-small", vocab_size=211, context_length=64, d_model=64, n_layers=3, n_heads=4)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        bos_token_id=0, eos_token_id=0, initializer_range=0.2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    randomize_norms(hf)
    ours = load_into(cfg, gpt2_weights(hf.state_dict(), cfg.n_layers))
    ids = random_ids(cfg.vocab_size)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, TOL)
