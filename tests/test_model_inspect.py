"""`slmkit inspect`: analytic parameter counts, FLOPs, KV cache and memory estimates."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slmkit.cli import main
from slmkit.config import PRESETS, ModelConfig
from slmkit.errors import InputError
from slmkit.model import Transformer
from slmkit.model.inspect import (
    count_parameters,
    forward_flops_per_token,
    inspect_config,
    kv_cache_bytes_per_token,
    resolve_config,
)
from slmkit.model.io import save_model_dir

VARIANTS = {
    "gpt2-biases-untied": dict(attn_bias=True, mlp_bias=True, lm_head_bias=True, tie_embeddings=False, pos="learned",
                               norm="layernorm"),
    "layernorm-no-bias": dict(norm="layernorm", norm_bias=False, mlp="gelu"),
    "qk-norm-geglu": dict(qk_norm=True, mlp="geglu", norm_plus_one=True),
    "mqa-head-dim": dict(n_kv_heads=1, head_dim=48),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_matches_the_built_model(name: str) -> None:
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = count_parameters(cfg)
    assert counted.total == model.num_parameters()
    assert counted.non_embedding == model.num_parameters(embedding=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_matches_for_variants(variant: str) -> None:
    cfg = ModelConfig.from_preset("tiny", **VARIANTS[variant])
    with torch.device("meta"):
        model = Transformer(cfg)
    assert count_parameters(cfg).total == model.num_parameters()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert count_parameters(cfg).matmul == linear


def test_gpt2_small_numbers() -> None:
    cfg = ModelConfig.from_preset("gpt2-small")
    p = count_parameters(cfg)
    assert p.total == 124_439_808
    assert p.embedding == 50257 * 768 + 1024 * 768
    assert p.matmul == 12 * 12 * 768 * 768 + 50257 * 768
    # 2 * matmul params + 2 * n_layers * (T + 1) * d_attn
    assert forward_flops_per_token(cfg, 1024) == 2 * 123_532_032 + 2 * 12 * 1025 * 768 == 265_956_864
    assert kv_cache_bytes_per_token(cfg, "fp32") == 2 * 12 * 768 * 4 == 73_728
    assert kv_cache_bytes_per_token(cfg, "int8") == 18_432


def test_forward_flops_agree_with_torch_flop_counter() -> None:
    """Counted on the reference attention (torch does not count the CPU SDPA kernel), whose
    scores cover all T x T pairs: the bidirectional formula."""
    cfg = ModelConfig.from_preset("tiny", causal=False, attention="reference")
    model = Transformer(cfg).eval()
    t = 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, t, dtype=torch.long))
    assert counter.get_total_flops() == t * forward_flops_per_token(cfg, t)


def test_memory_estimates_follow_the_documented_formulas() -> None:
    cfg = ModelConfig.from_preset("gpt2-small")
    info = inspect_config(cfg, batch_size=4, seq_len=512)
    n = 124_439_808
    fp32 = info["memory_bytes"]["training"]["fp32"]
    bf16 = info["memory_bytes"]["training"]["bf16_autocast"]
    assert (fp32["weights"], fp32["grads"], fp32["adamw_moments"]) == (4 * n, 4 * n, 8 * n)
    assert fp32["activations"] == 2 * bf16["activations"] > 0
    assert fp32["total"] == 16 * n + fp32["activations"]
    inference = info["memory_bytes"]["inference"]
    assert [inference[p]["weights"] for p in ("fp32", "bf16", "int8", "int4")] == [4 * n, 2 * n, n, n / 2]
    assert inference["fp32"]["kv_cache"] == 4 * 512 * 73_728
    assert inference["int4"]["kv_cache"] == inference["bf16"]["kv_cache"] == 4 * 512 * 36_864
    assert info["flops_per_token"]["training"] == 3 * info["flops_per_token"]["forward"]


def test_seq_len_beyond_context_is_an_input_error() -> None:
    with pytest.raises(InputError, match="longer than the model's context length 256"):
        inspect_config(ModelConfig.from_preset("tiny"), seq_len=257)


def test_resolve_config_reads_presets_and_model_dirs(tmp_path) -> None:
    assert resolve_config("tiny", {"n_layers": 2}).n_layers == 2
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2)
    save_model_dir(Transformer(cfg), tmp_path / "m")
    assert resolve_config(tmp_path / "m") == cfg
    assert resolve_config(tmp_path / "m", {"logit_softcap": 5.0}).logit_softcap == 5.0
    with pytest.raises(InputError, match="did you mean 'gpt2-small'"):
        resolve_config("gpt2-smal")
    with pytest.raises(InputError, match="no config.json"):
        resolve_config(tmp_path)


def test_cli_prints_a_table(capsys) -> None:
    assert main(["inspect", "gpt2-small", "--batch-size", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "85,056,000" in out
    assert "training memory at batch 2 x seq 128" in out and "int4" in out and "72.00 KiB" in out


def test_cli_json_and_overrides(capsys) -> None:
    assert main(["inspect", "tiny", "--set", "n_layers=2", "--seq-len", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.from_preset("tiny", n_layers=2)
    assert info["config"]["n_layers"] == 2 and info["seq_len"] == 64
    assert info["parameters"]["total"] == Transformer(cfg).num_parameters()
    assert info["flops_per_token"]["forward"] == forward_flops_per_token(cfg, 64)


def test_cli_bad_input_is_one_line_and_status_2(capsys) -> None:
    assert main(["inspect", "tiny", "--set", "n_layer=2"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown config key 'n_layer' (did you mean 'n_layers'?)"
    assert main(["inspect", "gpt2-smal"]) == 2
    assert "did you mean 'gpt2-small'" in capsys.readouterr().err
