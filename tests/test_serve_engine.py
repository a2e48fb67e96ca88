"""The serving engine: batched and paged generation equals one-request-at-a-time generation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from train_helpers import train_on_a_cycle

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.generation.api import generate_ids
from slmkit.generation.sampling import SamplingParams
from slmkit.model.transformer import Transformer
from slmkit.serve.engine import Engine, Request
from slmkit.serve.kv_pages import BlockManager
from slmkit.serve.speculative import DraftModel, MTPDrafter
from slmkit.tokenizer import train_bpe

# init_std 0.3 spreads the logits of a random model, so greedy choices are not near-ties
TINY = {"vocab_size": 128, "context_length": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
            "ffn_hidden": 64, "init_std": 0.3}


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [1, 5, 17, 33, 3, 16, 20, 9]


def reference(model, ps, max_tokens):
    return [generate_ids(model, [p], max_new_tokens=max_tokens)[0] for p in ps]


def run(engine, ps, max_tokens=12, **kw):
    return [out[0] for out in engine.generate([Request(p, max_tokens=max_tokens, stop_tokens=[], **kw) for p in ps])]


def test_batched_greedy_equals_single_requests_and_blocks_return():
    model = tiny()
    ps = prompts(LENGTHS)
    engine = Engine(model, block_size=4, max_batch_tokens=24, max_seqs=8)  # prompts prefill in chunks
    assert run(engine, ps) == reference(model, ps, 12)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
def test_position_schemes(pos):
    model = tiny(pos=pos)
    ps = prompts([3, 11, 7])
    assert run(Engine(model, block_size=4, max_batch_tokens=16), ps, 8) == reference(model, ps, 8)


def test_tiny_pool_preempts_and_still_completes_every_request():
    model = tiny()
    ps = prompts(LENGTHS)
    engine = Engine(model, block_size=4, num_blocks=12, max_batch_tokens=16, max_seqs=8)
    assert run(engine, ps) == reference(model, ps, 12)
    assert engine.preemptions > 0
    assert engine.blocks.num_free == 12


def test_prefix_cache_hit_and_same_output():
    model = tiny()
    system = prompts([24])[0]
    ps = [system + tail for tail in prompts([3, 6, 2], seed=5)]
    engine = Engine(model, block_size=4, max_batch_tokens=64)
    first = run(engine, ps[:1])
    assert engine.blocks.hit_rate == 0.0
    rest = run(engine, ps[1:])
    assert first + rest == reference(model, ps, 12)
    assert engine.blocks.hits >= 2 * (24 // 4)  # every full block of the shared prefix, for both requests
    out = engine.generate([Request(ps[1], max_tokens=1, stop_tokens=[])])
    assert out and engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_off_gives_no_hits():
    model = tiny()
    p = prompts([30])[0]
    engine = Engine(model, block_size=4, prefix_caching=False)
    assert run(engine, [p, p]) == reference(model, [p, p], 12)
    assert engine.blocks.hits == 0


def test_abort_frees_blocks_mid_generation():
    engine = Engine(tiny(), block_size=4, max_batch_tokens=32)
    keep = engine.submit(Request(prompts([10])[0], max_tokens=20, stop_tokens=[]))
    gone = engine.submit(Request(prompts([12], seed=3)[0], max_tokens=20, stop_tokens=[]))
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_used > 0
    engine.abort(gone)
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            reasons[out.request_id] = out.finish_reason or reasons.get(out.request_id)
    assert reasons == {keep: "length", gone: "abort"}
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_lru_eviction_reuses_the_oldest_cached_block():
    blocks = BlockManager(num_blocks=2, block_size=2)
    a, b = blocks.allocate(), blocks.allocate()
    blocks.register(a, b"a")
    blocks.register(b, b"b")
    blocks.release([a])
    blocks.release([b])
    assert blocks.num_free == 2
    assert blocks.allocate() == a  # released first, evicted first
    assert b"a" not in blocks.cached and b"b" in blocks.cached


def test_speculative_greedy_equals_plain_greedy():
    model = tiny()
    ps = prompts(LENGTHS)
    expected = reference(model, ps, 12)
    other = DraftModel(tiny(seed=7))  # an unrelated draft: mostly rejected, output unchanged
    engine = Engine(model, block_size=4, max_batch_tokens=64, drafter=other, num_draft=3)
    assert run(engine, ps) == expected
    assert engine.drafted > 0 and engine.acceptance_rate < 0.5
    assert engine.blocks.num_free == engine.blocks.num_blocks
    same = Engine(model, block_size=4, max_batch_tokens=64, drafter=DraftModel(model), num_draft=3)
    assert run(same, ps) == expected
    assert same.acceptance_rate == 1.0  # the model drafting for itself is always right


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_mtp_drafter_batched_greedy_equals_plain_greedy(prefix_caching):
    model = tiny(mtp_depth=2)
    system = prompts([12], seed=9)[0]  # shared by two prompts: a cache hit leaves the drafter a partial history
    ps = prompts(LENGTHS) + [system + [5, 6], system + [7]]
    drafter = MTPDrafter(model)
    engine = Engine(model, block_size=4, max_batch_tokens=24, max_seqs=10, drafter=drafter, num_draft=3,
                    prefix_caching=prefix_caching)
    assert run(engine, ps) == reference(model, ps, 12)
    assert engine.drafted > 0 and 0.0 <= engine.acceptance_rate <= 1.0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert drafter.hidden == {}  # every finished sequence was forgotten


def test_mtp_drafter_survives_preemption_and_skips_sampled_requests():
    model = tiny(mtp_depth=1)
    ps = prompts(LENGTHS)
    engine = Engine(model, block_size=4, num_blocks=12, max_batch_tokens=16, max_seqs=8, drafter=MTPDrafter(model))
    assert run(engine, ps) == reference(model, ps, 12)
    assert engine.preemptions > 0 and engine.drafted > 0
    assert engine.blocks.num_free == 12
    sampled = Engine(model, block_size=4, drafter=MTPDrafter(model))
    params = SamplingParams(repetition_penalty=1.5)
    assert run(sampled, ps[:2], params=params) == [generate_ids(model, [p], 12, params)[0] for p in ps[:2]]
    assert sampled.drafted == 0


def test_latent_attention_models_are_refused_clearly():
    mla = {"attention_kind": "mla", "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
    with pytest.raises(InputError, match="attention_kind='mla' models cannot be served"):
        Engine(tiny(mtp_depth=1, **mla))


def test_mtp_drafter_refuses_a_model_without_mtp_modules():
    with pytest.raises(InputError, match="needs a model that has them"):
        MTPDrafter(tiny())


def test_mtp_drafts_of_a_trained_model_are_mostly_accepted():
    """A model whose MTP modules learned a repeating sequence drafts it: most drafts are kept and
    the engine needs fewer steps than it emits tokens."""
    model = train_on_a_cycle(tiny(init_std=0.02, mtp_depth=2, mtp_loss_weight=1.0))
    ps = [[0, 1, 2], [3, 4, 5, 6, 0], [5, 6]]
    engine = Engine(model, block_size=4, drafter=MTPDrafter(model), num_draft=2)
    ids = [engine.submit(Request(p, max_tokens=30, stop_tokens=[])) for p in ps]
    outputs, steps = {i: [] for i in ids}, 0
    while engine.has_work():
        steps += 1
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    assert [outputs[i] for i in ids] == reference(model, ps, 30)
    assert engine.acceptance_rate > 0.5
    assert steps < 30


def test_seeded_sampling_is_reproducible_and_n_gives_independent_draws():
    engine = Engine(tiny(), block_size=4)
    request = {"prompt": prompts([5])[0], "max_tokens": 10, "params": SamplingParams(temperature=1.0, top_k=20, top_p=0.9),
                   "stop_tokens": [], "seed": 3, "n": 2}
    a = engine.generate([Request(**request)])[0]
    b = engine.generate([Request(**request)])[0]
    assert a == b and a[0] != a[1]


def test_penalties_match_the_generation_loop():
    model = tiny()
    ps = prompts([6, 9])
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3)
    expected = [generate_ids(model, [p], 12, params)[0] for p in ps]
    assert run(Engine(model, block_size=4), ps, params=params) == expected


def test_logprobs_are_the_models_log_softmax():
    model = tiny()
    p = prompts([7])[0]
    engine = Engine(model, block_size=4)
    engine.submit(Request(p, max_tokens=1, stop_tokens=[], logprobs=3))
    out = engine.step()[0]  # the whole prompt fits one step
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([p]))[0, -1].float(), -1)
    token_logprob, top = out.logprobs[0]
    assert token_logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert list(top) == expected.topk(3).indices.tolist()


def _adapter(tmp_path, name, model, rank, targets, seed):
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = {}
    for target in targets:
        linear = modules[target]
        tensors[f"{target}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.3
        tensors[f"{target}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.3
    path = tmp_path / name
    path.mkdir()
    save_file(tensors, str(path / "adapter.safetensors"))
    (path / "adapter_config.json").write_text(f'{{"r": {rank}, "lora_alpha": {2 * rank}}}')
    return path, tensors


def _merged(tensors, scale, seed=0, **overrides):
    model = tiny(seed, **overrides)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                name = key.removesuffix(".lora_A.weight")
                modules[name].weight += scale * tensors[f"{name}.lora_B.weight"] @ a
    return model


def test_one_batch_mixes_adapters_and_the_base(tmp_path):
    base = tiny()
    first, t1 = _adapter(tmp_path, "first", base, 4, ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"], 1)
    second, t2 = _adapter(tmp_path, "second", base, 2, ["layers.0.self_attn.v_proj"], 2)
    ps = prompts([5, 8, 13])
    expected = [reference(tiny(), ps[:1], 10)[0], reference(_merged(t1, 2.0), ps[1:2], 10)[0],
                reference(_merged(t2, 2.0), ps[2:], 10)[0]]
    engine = Engine(tiny(), block_size=4, adapters={"first": first, "second": second})
    outs = engine.generate([Request(p, max_tokens=10, stop_tokens=[], adapter=a) for p, a in zip(ps, [None, "first", "second"])])
    assert [o[0] for o in outs] == expected
    assert len(set(map(tuple, expected))) == 3  # the adapters change the output


def test_mtp_drafter_with_adapters_in_the_batch(tmp_path):
    """Adapters may also cover the MTP block; a mixed batch still decodes exactly like each model alone."""
    base = tiny(mtp_depth=1)
    path, tensors = _adapter(tmp_path, "domain", base, 4, ["layers.0.self_attn.q_proj", "mtp.layers.0.block.self_attn.q_proj"], 1)
    merged = _merged(tensors, 2.0, mtp_depth=1)
    ps = prompts([5, 8, 13])
    engine = Engine(base, block_size=4, adapters={"domain": path}, drafter=MTPDrafter(base), num_draft=1)
    outs = engine.generate([Request(p, max_tokens=10, stop_tokens=[], adapter=a) for p, a in zip(ps, [None, "domain", None])])
    assert [o[0] for o in outs] == [reference(tiny(mtp_depth=1), ps[:1], 10)[0], reference(merged, ps[1:2], 10)[0],
                                    reference(tiny(mtp_depth=1), ps[2:], 10)[0]]
    assert engine.drafted > 0


def full_forward_logprobs(model, prompt):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)


def prompt_logprobs_of(engine, requests):
    """Each request's prompt logprobs (from its first output) and output tokens, stepping the engine."""
    ids = [engine.submit(r) for r in requests]
    scored, tokens = {}, {rid: [] for rid in ids}
    while engine.has_work():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in scored  # delivered once, with the first output
                scored[out.request_id] = out.prompt_logprobs
            tokens[out.request_id] += out.token_ids
    return [scored[rid] for rid in ids], [tokens[rid] for rid in ids]


@pytest.mark.parametrize("engine_kw", [
    {"max_batch_tokens": 64},  # every prompt in one pass
    {"max_batch_tokens": 8},  # prompts prefilled in chunks of up to 8 tokens
    {"max_batch_tokens": 16, "num_blocks": 12},  # a pool too small: sequences are preempted and recomputed
])
def test_prompt_logprobs_are_the_full_forward_pass_log_softmax(engine_kw):
    model = tiny()
    ps = prompts([1, 5, 17, 33, 9])
    engine = Engine(model, block_size=4, **engine_kw)
    scored, tokens = prompt_logprobs_of(engine, [Request(p, max_tokens=12, stop_tokens=[], prompt_logprobs=2) for p in ps])
    assert tokens == reference(model, ps, 12)  # scoring the prompt changes nothing of the output
    for p, got in zip(ps, scored):
        expected = full_forward_logprobs(model, p)
        assert len(got) == len(p) and got[0] is None
        for t in range(1, len(p)):
            logprob, top = got[t]
            assert logprob == pytest.approx(float(expected[t - 1, p[t]]), abs=1e-4)
            assert list(top) == expected[t - 1].topk(2).indices.tolist()
            assert list(top.values()) == pytest.approx(expected[t - 1].topk(2).values.tolist(), abs=1e-4)
    if "num_blocks" in engine_kw:
        assert engine.preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prompt_logprobs_are_computed_not_read_from_the_prefix_cache():
    model = tiny()
    p = prompts([20])[0]
    engine = Engine(model, block_size=4)
    engine.generate([Request(p, max_tokens=2, stop_tokens=[])])  # its full blocks are now cached
    scored, _ = prompt_logprobs_of(engine, [Request(p, max_tokens=2, stop_tokens=[], prompt_logprobs=0)])
    expected = full_forward_logprobs(model, p)
    assert [lp for lp, _ in scored[0][1:]] == pytest.approx([float(expected[t - 1, p[t]]) for t in range(1, 20)], abs=1e-4)
    engine.submit(Request(p, max_tokens=2, stop_tokens=[]))
    assert engine.step()[0].cached_tokens == 16  # the request without prompt logprobs still hits the cache


def test_logit_bias_min_tokens_and_stop_token_ids_act_on_their_own_sequence_only():
    """Four requests in one batch, each with its own setting; every one gives what it gives alone."""
    model = tiny()
    p = prompts([6])[0]
    plain = reference(model, [p], 8)[0]
    stop_id = next(t for i, t in enumerate(plain) if t not in plain[:i] and i >= 2)
    biased = [Request(p, max_tokens=8, stop_tokens=[], logit_bias={5: 100.0}),
              Request(p, max_tokens=8, stop_tokens=[5], logit_bias={5: 100.0}, min_tokens=3),
              Request(p, max_tokens=8, stop_tokens=[], stop_token_ids=[stop_id]),
              Request(p, max_tokens=8, stop_tokens=[])]
    engine = Engine(model, block_size=4, max_batch_tokens=64)
    together = [out[0] for out in engine.generate(biased)]
    alone = [Engine(model, block_size=4).generate([r])[0][0] for r in biased]
    assert together == alone
    assert together[0] == [5] * 8  # +100 makes token 5 the greedy choice
    assert len(together[1]) == 3 and 5 not in together[1]  # 5 stops it, but only once 3 tokens are out
    assert together[2] == plain[: plain.index(stop_id)]
    assert together[3] == plain


def test_min_tokens_holds_back_stop_strings_too():
    """As in vLLM, a stop string counts only in tokens past min_tokens."""
    tokenizer = train_bpe(["AAAA hello there, hello again. " * 20], 270)
    model = tiny(vocab_size=tokenizer.vocab_size)
    [a] = tokenizer.encode("A")
    engine = Engine(model, tokenizer, block_size=4)
    request = dict(prompt=tokenizer.encode("hello"), max_tokens=8, stop=["A"], stop_tokens=[], logit_bias={a: 100.0})
    ids = [engine.submit(Request(**request)), engine.submit(Request(**request, min_tokens=3))]
    texts, reasons = dict.fromkeys(ids, ""), {}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
            reasons[out.request_id] = out.finish_reason
    assert [texts[i] for i in ids] == ["", "AAA"] and [reasons[i] for i in ids] == ["stop", "stop"]


def test_logprobs_zero_is_served_beside_a_drafter():
    """logprobs 0 (the chosen token's logprob alone) takes no drafts: every token gets its logprob."""
    model = tiny()
    engine = Engine(model, block_size=4, drafter=DraftModel(model), num_draft=3)
    engine.submit(Request(prompts([5])[0], max_tokens=10, stop_tokens=[], logprobs=0))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert sum(len(o.token_ids) for o in outs) == 10 and sum(len(o.logprobs) for o in outs) == 10
    assert engine.drafted == 0


@pytest.mark.parametrize("request_kw, message", [
    ({"prompt": []}, "prompt is empty"),
    ({"prompt": [1] * 64}, "context is 64"),
    ({"prompt": [1], "max_tokens": 0}, "max_tokens must be at least 1"),
    ({"prompt": [1] * 60, "max_tokens": 10}, "exceed the model's context"),
    ({"prompt": [1], "n": 100}, "n must be between 1 and"),
    ({"prompt": [1], "adapter": "nope"}, "unknown adapter 'nope'"),
    ({"prompt": [500]}, "prompt token ids must be in"),
    ({"prompt": [1], "logit_bias": {500: 1.0}}, "logit_bias token ids must be in"),
    ({"prompt": [1], "logit_bias": {5: 101.0}}, "logit_bias values must be between -100 and 100"),
    ({"prompt": [1], "stop_token_ids": [128]}, "stop_token_ids token ids must be in"),
    ({"prompt": [1], "max_tokens": 4, "min_tokens": 5}, "min_tokens must be between 0 and max_tokens"),
    ({"prompt": [1], "prompt_logprobs": 21}, "prompt_logprobs must be between 0 and 20"),
])
def test_bad_requests_are_rejected(request_kw, message):
    with pytest.raises(InputError, match=message):
        Engine(tiny(), block_size=4).submit(Request(**request_kw))


def test_serves_an_adapter_as_finetuning_saves_it(tmp_path):
    """An adapter written by `slmkit.model.lora.save_adapter` (PEFT key layout) serves exactly like
    the same adapter merged into the weights."""
    from slmkit.model import lora

    trained = tiny()
    lora.inject_lora(trained, rank=4, alpha=8.0, targets=["q", "v", "down"])
    torch.manual_seed(3)
    for _, layer in lora.lora_layers(trained):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    lora.save_adapter(trained, tmp_path / "domain")
    lora.merge(trained)
    merged = lora.unwrap(trained).eval()
    ps = prompts([6, 9])
    engine = Engine(tiny(), block_size=4, adapters={"domain": tmp_path / "domain"})
    outs = engine.generate([Request(p, max_tokens=10, stop_tokens=[], adapter="domain") for p in ps])
    assert [o[0] for o in outs] == reference(merged, ps, 10)
    assert [o[0] for o in outs] != reference(tiny(), ps, 10)
