"""The model returns what a forward pass computed (ModelOutput) and leaves nothing on its modules;
every cache it accepts implements the declared protocol."""

from __future__ import annotations

import typing

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.export.onnx import PastKeyValues, empty_past
from slmkit.generation.ort import FusedCache, OrtCache
from slmkit.model.attention import KVCache
from slmkit.model.cache import Cache, DecodingCache, RaggedCache
from slmkit.quant.fp8_cache import FP8KVCache, FP8LatentCache
from slmkit.model.mla import LatentCache
from slmkit.model.moe import MoE
from slmkit.model.transformer import ModelOutput, Transformer
from slmkit.serve.kv_pages import KVPool, PagedBatch

SMALL = dict(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, init_std=0.3)
MLA = dict(attention_kind="mla", kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MOE = dict(ffn_kind="moe", n_experts=8, n_experts_per_tok=2, moe_ffn_hidden=16, aux_loss_coef=0.01)


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **overrides}))


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def module_state(model: torch.nn.Module) -> dict[str, set[str]]:
    """Every module's plain attributes (not parameters, buffers or submodules)."""
    return {name: set(vars(m)) - {"_parameters", "_buffers", "_modules"} for name, m in model.named_modules()}


def test_forward_leaves_no_state_and_returns_what_callers_need() -> None:
    model = build(mtp_depth=2, **MOE).train()
    before = module_state(model)
    x1, x2, y1, y2 = ids(2, 12), ids(2, 12, seed=2), ids(2, 12, seed=3), ids(2, 12, seed=4)
    first, second = model(x1, targets=y1), model(x2, targets=y2)
    assert module_state(model) == before  # a forward adds no attribute anywhere
    assert not hasattr(model, "mtp_hidden")
    assert not any(hasattr(m, "aux_loss") or "load" in m._buffers for m in model.modules() if isinstance(m, MoE))
    assert isinstance(first, ModelOutput) and first.logits.shape == (2, 12, 97)
    # the first pass's results are its own, not overwritten by the second pass
    again = model(x1, targets=y1)
    for a, b in [(first.logits, again.logits), (first.last_hidden, again.last_hidden), (first.aux_loss, again.aux_loss),
                 *zip(first.mtp_logits, again.mtp_logits)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first.last_hidden, second.last_hidden)
    assert [t.shape for t in first.mtp_logits] == [(2, 12, 97), (2, 11, 97)]
    # 2 MoE blocks, then the 2 MTP blocks: 24 tokens routed to 2 experts each, 22 at depth 2
    assert first.expert_load.load.shape == (4, 8) and first.expert_load.load.sum(dim=1).tolist() == [48.0, 48.0, 48.0, 44.0]
    assert first.aux_loss.item() > 0 and first.aux_loss.requires_grad


def test_the_two_halves_give_the_logits_and_eval_reports_no_router_stats() -> None:
    model = build(**MOE).eval()
    x = ids(2, 10)
    logits = model(x)
    assert isinstance(logits, torch.Tensor)
    out = model.forward_hidden(x)
    torch.testing.assert_close(model.head(out.hidden), logits, rtol=0, atol=0)
    torch.testing.assert_close(model.norm(out.last_hidden), out.hidden, rtol=0, atol=0)
    torch.testing.assert_close(model(x, return_hidden=True), out.hidden, rtol=0, atol=0)
    assert out.router == [] and out.expert_load is None and out.aux_loss is None
    kept = model.forward_hidden(x, logits_to_keep=1)
    assert kept.hidden.shape == (2, 1, 32) and kept.last_hidden.shape == (2, 10, 32)
    torch.testing.assert_close(model(x, targets=x).logits, logits, rtol=0, atol=0)


def test_every_cache_implements_the_declared_protocol() -> None:
    assert typing.get_type_hints(Transformer.forward)["cache"] == Cache | None
    mha, mla = build().eval(), build(**MLA).eval()
    caches = [mha.new_cache(2), mla.new_cache(2), mha.new_cache(2, fp8=True), mla.new_cache(2, fp8=True)]
    assert [type(c) for c in caches] == [KVCache, LatentCache, FP8KVCache, FP8LatentCache]
    pool = KVPool(mha.cfg, num_blocks=4, block_size=4, device=torch.device("cpu"), dtype=torch.float32)
    paged = PagedBatch(pool, [[0, 1], [2]], starts=[3, 0], counts=[1, 2])
    onnx_past = PastKeyValues(empty_past(mha, 2))
    for cache in [*caches, onnx_past, paged]:
        assert Cache in type(cache).__mro__ and isinstance(cache, Cache)  # declared, and structurally true
    assert isinstance(paged, RaggedCache) and paged.mask.shape == (2, 1, 2, 4)
    for cache_type in (KVCache, LatentCache, FP8KVCache, FP8LatentCache, OrtCache, FusedCache):
        assert DecodingCache in cache_type.__mro__
    assert all(isinstance(c, DecodingCache) for c in caches) and isinstance(OrtCache([]), DecodingCache)


@pytest.mark.parametrize("variant", [{}, MLA], ids=["mha", "mla"])
def test_a_contiguous_cache_decodes_like_a_full_forward(variant: dict) -> None:
    model = build(**variant).eval()
    x = ids(1, 9)
    cache = model.new_cache(1)
    steps = [model(x[:, :6], cache=cache)[:, -1]] + [model(x[:, i : i + 1], cache=cache)[:, -1] for i in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps), model(x)[0, 5:], rtol=1e-4, atol=1e-4)
    assert cache.length == 9
