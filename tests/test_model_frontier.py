"""Latent attention, mixture-of-experts, multi-token prediction and FP8: each against its reference."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from train_helpers import train_on_a_cycle

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.generation.decode import sample
from slmkit.generation.sampling import SamplingParams
from slmkit.model import Transformer
from slmkit.model.inspect import count_parameters, kv_cache_bytes_per_token
from slmkit.model.moe import (
    ExpertLoad,
    MoE,
    balance_loss,
    balance_step,
    dense_reference,
    dispatch,
    kept_assignments,
)
from slmkit.model.mtp import speculative_greedy
from slmkit.quant import fp8
from slmkit.quant.linear import FP8Linear, FP8TrainingLinear, use_fp8_linears
from slmkit.quant.methods import quantize_model
from slmkit.train.loop import model_losses
from slmkit.train.objectives.lm import multi_token_loss

SMALL = dict(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, init_std=0.3)
MLA = dict(attention_kind="mla", kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MOE = dict(ffn_kind="moe", n_experts=8, n_experts_per_tok=2, moe_ffn_hidden=16)


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- MLA
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["q-full", "q-lora"])
def test_absorbed_mla_equals_naive(attention: str, q_lora_rank: int | None) -> None:
    naive = build(**MLA, q_lora_rank=q_lora_rank, attention=attention)
    absorbed = Transformer(naive.cfg.replace(mla_absorb=True)).eval()
    absorbed.load_state_dict(naive.state_dict())
    x = ids(3, 20)
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # left padding
    with torch.no_grad():
        assert_close(absorbed(x), naive(x), 1e-5)
        assert_close(absorbed(x, attention_mask=mask), naive(x, attention_mask=mask), 1e-5)


@pytest.mark.parametrize("absorb", [False, True], ids=["naive", "absorbed"])
def test_mla_cached_decoding_equals_full_forward(absorb: bool) -> None:
    model = build(**MLA, mla_absorb=absorb)
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i : i + 1], cache=cache) for i in range(5, 16)]
    assert_close(torch.cat(steps, dim=1), full, 1e-5)


def test_mla_cache_holds_only_the_latent_and_the_rope_key() -> None:
    model = build(**MLA)
    cache = model.new_cache(2, max_len=10)
    cfg = model.cfg
    assert cache.latent.shape == (cfg.n_layers, 2, 10, cfg.kv_lora_rank)
    assert cache.rope_key.shape == (cfg.n_layers, 2, 10, cfg.qk_rope_head_dim)
    per_token = cache.nbytes() / (2 * 10)
    assert per_token == cfg.n_layers * (12 + 4) * 4 == kv_cache_bytes_per_token(cfg, "fp32")
    mha = build().new_cache(2, max_len=10)
    assert (mha.k.nbytes + mha.v.nbytes) / (2 * 10) == 2 * cfg.n_layers * cfg.d_model * 4 == 4 * per_token


def test_mla_config_errors() -> None:
    with pytest.raises(InputError, match="kv_lora_rank"):
        ModelConfig(**SMALL, attention_kind="mla")


# ---------------------------------------------------------------------------- MoE
def moe_layer(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**SMALL, **MOE, "init_std": 0.2, **overrides})
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


ROUTERS = {
    "softmax": dict(),
    "softmax-unnormalized": dict(norm_topk_prob=False),
    "sigmoid-groups-shared": dict(router_score="sigmoid", n_expert_groups=4, topk_groups=2, n_shared_experts=2,
                                  routed_scaling=2.5),
}


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "capacity"])
def test_sorted_dispatch_equals_dense_reference(router: str, capacity_factor: float | None) -> None:
    layer = moe_layer(**ROUTERS[router], capacity_factor=capacity_factor)
    x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    fast, _ = layer(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *layer.parameters()])
    layer.reference = True
    slow, _ = layer(x)
    grads_slow = torch.autograd.grad(slow.square().sum(), [x, *layer.parameters()])
    assert_close(fast, slow, 1e-5)
    for a, b in zip(grads_fast, grads_slow):
        assert_close(a, b, 1e-4)


def test_capacity_drops_late_tokens_and_caps_every_expert() -> None:
    layer = moe_layer(capacity_factor=0.5)
    x = torch.randn(120, 32, generator=torch.Generator().manual_seed(3))
    routing = layer.gate(x)
    keep = kept_assignments(routing, 30)  # 0.5 * 120 * 2 / 8
    kept_load = torch.bincount(routing.experts[keep], minlength=8)
    assert kept_load.max() <= 30 and (~keep).sum() > 0
    # a dropped assignment is the last ones of its expert: every kept one precedes every dropped one
    for e in range(8):
        order = keep[routing.experts == e]
        assert not (order[1:] & ~order[:-1]).any()
    dropless = kept_assignments(routing, None)
    assert dropless.all()
    assert_close(dispatch(x, routing, layer.experts, keep), dense_reference(x, routing, layer.experts, keep), 1e-5)
    assert max_diff(dispatch(x, routing, layer.experts, kept_assignments(routing, 10**6)),
                    dispatch(x, routing, layer.experts, dropless)) == 0


def skewed_layer(rate: float) -> tuple[MoE, torch.Tensor]:
    """A router that sends almost every token of the input to experts 0 and 1."""
    layer = moe_layer(router_score="sigmoid", router_bias_rate=rate).train()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(4)) + 1.0
    with torch.no_grad():
        layer.gate.weight.normal_(std=0.1)
        layer.gate.weight[:2] += 0.1
    return layer, x


def test_aux_loss_free_bias_moves_load_toward_balance() -> None:
    layer, x = skewed_layer(rate=0.01)
    history = []
    for _ in range(60):
        with torch.no_grad():
            _, stats = layer(x)
        history.append(balance_step(layer, [ExpertLoad.of([stats])])["moe_max_mean"][0])
    assert history[0] >= 3.5  # 2 of 8 experts take nearly all the load: max/mean near 4
    assert sum(history[-10:]) / 10 <= 1.5  # measured: 1.33
    frozen, _ = skewed_layer(rate=0.0)
    for _ in range(5):
        with torch.no_grad():
            _, stats = frozen(x)
        assert balance_step(frozen, [ExpertLoad.of([stats])])["moe_max_mean"][0] >= 3.5


def test_balance_loss_is_one_when_balanced_and_larger_when_skewed() -> None:
    layer, x = skewed_layer(rate=0.0)
    x.requires_grad_(False)
    loss = balance_loss(layer.gate(x), 8)
    assert loss.item() > 1.4
    loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    uniform = layer.gate(x)
    uniform.scores = torch.full_like(uniform.scores, 1 / 8)
    uniform.experts = torch.arange(256 * 2).view(256, 2) % 8
    assert balance_loss(uniform, 8).item() == pytest.approx(1.0)


def test_utilization_is_logged_per_layer_and_micro_batches_add_up() -> None:
    model = build(**MOE, n_layers=3, first_k_dense=1, router_bias_rate=0.01).train()
    first, second = model.forward_hidden(ids(2, 16)), model.forward_hidden(ids(2, 16, seed=2))
    assert first.expert_load.load.shape == (2, 8) and first.expert_load.load.sum(dim=1).tolist() == [64.0, 64.0]
    stats = balance_step(model, [first.expert_load])
    assert len(stats["moe_max_mean"]) == 2 and all(v >= 1.0 for v in stats["moe_max_mean"])
    assert all(0.0 < v <= 1.0 for v in stats["moe_entropy"])
    # one optimizer step over two micro-batches: the bias moves by the sign of their summed load
    bias = [m.gate.e_score_correction_bias.clone() for m in model.modules() if isinstance(m, MoE)]
    total = first.expert_load.load + second.expert_load.load
    stats = balance_step(model, [first.expert_load, second.expert_load])
    assert stats["moe_max_mean"] == pytest.approx([(t.max() / t.mean()).item() for t in total])
    after = [m.gate.e_score_correction_bias for m in model.modules() if isinstance(m, MoE)]
    for before, now, load in zip(bias, after, total):
        torch.testing.assert_close(now - before, 0.01 * torch.sign(load.mean() - load))
    assert balance_step(model, [None, None]) == {}  # dense, or not training: nothing to balance


# ---------------------------------------------------------------------------- MTP
def test_mtp_logits_and_loss_shapes_and_masking() -> None:
    model = build(mtp_depth=3).train()
    x, y = ids(2, 12), ids(2, 12, seed=5)
    output = model(x, targets=y)
    logits = output.mtp_logits
    assert [t.shape for t in logits] == [(2, 12, 97), (2, 11, 97), (2, 10, 97)]
    loss = multi_token_loss(logits, y)
    by_hand = sum(torch.nn.functional.cross_entropy(l[:, : 12 - k].flatten(0, 1), y[:, k:].flatten())
                  for k, l in enumerate(logits, start=1)) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    masked = y.clone()
    masked[:, 6:] = -100  # ignored targets do not count
    expected = sum(torch.nn.functional.cross_entropy(l[:, : 6 - k].flatten(0, 1), y[:, k:6].flatten())
                   for k, l in enumerate(logits, start=1)) / 3
    assert multi_token_loss(logits, masked).item() == pytest.approx(expected.item(), rel=1e-6)
    total, logs = model_losses(model, output, y)
    assert logs["mtp_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert total.item() == pytest.approx(0.3 * loss.item(), rel=1e-6)
    total.backward()
    assert model.mtp.layers[2].eh_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", [dict(mtp_depth=1), dict(mtp_depth=3, **MLA, **MOE)], ids=["d1", "d3-mla-moe"])
def test_self_speculative_decoding_equals_greedy(variant: dict) -> None:
    model = build(init_std=0.1, **variant)
    prompt = ids(1, 5)[0].tolist()
    greedy = [int(t) for t in sample(model, [prompt], SamplingParams(temperature=0.0), max_new_tokens=30)]
    result = speculative_greedy(model, prompt, max_new_tokens=30)
    assert result.tokens == greedy
    assert 0.0 <= result.acceptance_rate <= 1.0 and result.drafted > 0
    assert result.forward_passes <= 29
    stopped = speculative_greedy(model, prompt, max_new_tokens=30, stop_tokens=[greedy[10]])
    assert stopped.tokens == greedy[: greedy.index(greedy[10])]


def test_speculative_decoding_accepts_drafts_of_a_model_that_predicts_them() -> None:
    """A model trained on a repeating sequence drafts the right tokens: acceptance near 1, fewer passes."""
    torch.manual_seed(0)
    model = train_on_a_cycle(Transformer(ModelConfig(**{**SMALL, "init_std": 0.02, "mtp_depth": 2, "mtp_loss_weight": 1.0})))
    result = speculative_greedy(model, [0, 1, 2], max_new_tokens=30)
    assert result.tokens == [int(t) for t in sample(model, [[0, 1, 2]], SamplingParams(temperature=0.0), 30)]
    assert result.acceptance_rate >= 0.8
    assert result.forward_passes <= 15


# ---------------------------------------------------------------------------- FP8
def test_fp8_formats_ranges_and_round_trip_error() -> None:
    assert fp8.fp8_max(fp8.E4M3) == 448.0 and fp8.fp8_max(fp8.E5M2) == 57344.0
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    for dtype, mantissa_bits in ((fp8.E4M3, 3), (fp8.E5M2, 2)):
        q, scale = fp8.quantize(x, dtype, (1, 128))
        assert q.dtype == dtype and scale.shape == (64, 2)
        error = (fp8.dequantize(q, scale) - x).abs()
        # round to nearest: half a unit in the last place, relative, for values in the normal range;
        # tiny values fall into subnormals where the absolute error is bounded by the smallest step
        relative_bound = 2.0 ** -(mantissa_bits + 1)
        big = x.abs() >= scale.repeat_interleave(128, dim=1) * torch.finfo(dtype).smallest_normal
        assert (error[big] <= relative_bound * x.abs()[big] + 1e-7).all()
    e4 = (fp8.fake_quantize(x, fp8.E4M3, None) - x).abs().mean()
    e5 = (fp8.fake_quantize(x, fp8.E5M2, None) - x).abs().mean()
    assert e4 < e5  # e4m3 is finer, e5m2 wider
    huge = torch.tensor([[1e4, -1e4, 1.0]])
    assert torch.tensor([1e4]).to(fp8.E4M3).float().isnan().item() or torch.tensor([1e4]).to(fp8.E4M3).float().item() != 1e4
    assert fp8.fake_quantize(huge, fp8.E4M3, None)[0, :2].tolist() == [1e4, -1e4]  # scaling keeps it in range


def test_block_scaling_beats_per_tensor_on_outliers() -> None:
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    w[3, 5] = 1e5  # one outlier: with one scale for all, the normal values sink into fp8's subnormals
    per_tensor = (fp8.fake_quantize(w, fp8.E4M3, None) - w).abs()
    blockwise = (fp8.fake_quantize(w, fp8.E4M3, (128, 128)) - w).abs()
    outside = torch.ones_like(w, dtype=torch.bool)
    outside[:128, :128] = False  # the outlier's own block suffers either way
    assert blockwise[outside].mean() < per_tensor[outside].mean() / 5  # measured: 6x


@pytest.mark.parametrize("granularity", ["blockwise", "tensor"])
def test_fp8_linear_forward_and_gradients_stay_close_to_fp32(granularity: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192)
    x = torch.randn(4, 32, 256, requires_grad=True)
    y_ref = linear(x)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref.square().sum(), [x, linear.weight, linear.bias])
    use_fp8_linears(torch.nn.Sequential(linear), granularity)
    assert isinstance(linear, FP8TrainingLinear)
    y = linear(x)
    gx, gw, gb = torch.autograd.grad(y.square().sum(), [x, linear.weight, linear.bias])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(y, y_ref) <= 0.05  # e4m3: ~3% per operand, partly averaging out in the dot products
    assert rel(gx, gx_ref) <= 0.12 and rel(gw, gw_ref) <= 0.12  # e5m2 gradients on top
    assert rel(gb, gb_ref) <= 0.05


def test_scaled_mm_matches_emulation_where_supported() -> None:
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    emulated = fp8.fp8_matmul(x, w, "tensor", native=False)
    if not fp8.scaled_mm_supported("cpu"):
        pytest.skip("torch._scaled_mm does not run on this CPU")
    native = fp8.fp8_matmul(x, w, "tensor", native=True)
    assert max_diff(native, emulated) <= 1e-4 * emulated.abs().max().item()


def test_fp8_model_trains_and_fp8_weight_storage_and_kv_cache() -> None:
    model = build(fp8="blockwise").train()
    x = ids(4, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    dense = build(**MLA).eval()
    with torch.no_grad():
        expected = dense(x)
        cache = dense.new_cache(4, fp8=True)
        stepped = torch.cat([dense(x[:, :8], cache=cache)] + [dense(x[:, i : i + 1], cache=cache) for i in range(8, 24)], 1)
        assert cache.nbytes() < dense.new_cache(4).nbytes() / 2  # 1 byte per value + one fp32 scale per vector
        # e4m3 rounds each value by up to 2^-4 relative; two layers of large random weights compound it
        assert ((stepped - expected).norm() / expected.norm()).item() <= 0.1
        quantize_model(dense, "fp8")  # fp8 weight storage for inference
        assert ((dense(x) - expected).norm() / expected.norm()).item() <= 0.15
    fp8_bytes = sum(b.nbytes for n, b in dense.named_buffers() if n.endswith("qweight"))
    stored = [m for m in dense.modules() if isinstance(m, FP8Linear)]
    assert stored and fp8_bytes == sum(m.out_features * m.in_features for m in stored)


# ---------------------------------------------------------------------------- presets and counting
@pytest.mark.parametrize("name, total, active", [
    ("deepseek-v3-671b", 671e9, 37e9), ("mixtral-8x7b", 46.7e9, 12.9e9), ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_real_sizes_match_the_published_counts(name: str, total: float, active: float) -> None:
    p = count_parameters(ModelConfig.from_preset(name))
    assert p.total - p.mtp == pytest.approx(total, rel=0.01)
    assert p.active == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("variant", [dict(**MLA, **MOE, n_shared_experts=1, first_k_dense=1, mtp_depth=2, q_lora_rank=8,
                                          attn_bias=True)])
def test_parameter_counts_of_frontier_variants(variant: dict) -> None:
    model = build(**variant)
    p = count_parameters(model.cfg)
    assert p.total == model.num_parameters()
    assert p.mtp == sum(t.numel() for t in model.mtp.parameters())
    expert = sum(t.numel() for t in model.layers[1].mlp.experts[0].parameters())
    assert p.total - p.active == p.mtp + (8 - 2) * expert


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("preset", ["deepseek-tiny", "mixtral-tiny", "qwen3-moe-tiny"])
def test_frontier_presets_train_with_falling_loss_and_log_utilization(preset: str, verdict, tmp_path) -> None:
    from train_helpers import losses, run

    shrink = dict(d_model=64, n_layers=2, n_heads=2, context_length=32, moe_ffn_hidden=32)
    if preset == "qwen3-moe-tiny":
        shrink["head_dim"] = 32
    records = run(verdict, tmp_path / "run", preset=preset, max_steps=12, model=shrink)
    curve = losses(records)
    assert curve[-1] < curve[0] - 0.5
    utilization = [r["moe_max_mean"] for r in records if "moe_max_mean" in r]
    assert len(utilization) == 12 and all(len(u) == 2 for u in utilization)  # deepseek: 1 MoE layer + the MTP block
    assert all(1.0 <= v <= 8.0 for u in utilization for v in u)
