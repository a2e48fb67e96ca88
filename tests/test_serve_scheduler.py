"""The scheduler on its own (no model): token budget, chunked prefill, prefix cache, preemption,
and what postprocess does with chosen tokens."""

from __future__ import annotations

import torch

from slmkit.generation.sampling import SamplingParams
from slmkit.serve.kv_pages import BlockManager
from slmkit.serve.sampler import Choice
from slmkit.serve.scheduler import Scheduler
from slmkit.serve.sequence import Request, SequenceState

CPU = torch.device("cpu")


def sequence(seq_id: int, prompt: list[int], max_tokens: int = 8, **kw) -> SequenceState:
    request = Request(prompt, max_tokens=max_tokens, stop_tokens=[99], request_id=f"r{seq_id}", **kw)
    return SequenceState.start(seq_id, request, 0, None, CPU)


def scheduler(num_blocks: int = 16, budget: int = 8, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size=4), max_batch_tokens=budget, max_seqs=4, context=64, **kw)


def test_budget_chunks_prefill_then_decodes_and_postprocess_finishes():
    s = scheduler(budget=8)
    a, b = sequence(0, list(range(10)), max_tokens=2), sequence(1, [1, 2, 3])
    s.add(a)
    s.add(b)
    batch = s.schedule()  # a's prompt is longer than the budget: its first 8 tokens only
    assert [(i.seq, i.start, i.tokens, i.samples) for i in batch] == [(a, 0, list(range(8)), False)]
    assert s.postprocess(batch, [None]) == [] and a.num_computed == 8 and len(a.blocks) == 2
    batch = s.schedule()  # running first: a's last 2 prompt tokens, then b's whole prompt
    assert [(i.seq, i.start, i.tokens, i.samples) for i in batch] == [(a, 8, [8, 9], True), (b, 0, [1, 2, 3], True)]
    outputs = s.postprocess(batch, [Choice([42], [None]), Choice([99], [None])])  # 99: b's stop token
    assert [(o.request_id, o.token_ids, o.finish_reason) for o in outputs] == [("r0", [42], None), ("r1", [], "stop")]
    assert s.running == [a] and b.blocks == [] and a.tokens[-1] == 42
    batch = s.schedule()  # a decodes one token: its newest
    assert [(i.start, i.tokens) for i in batch] == [(10, [42])]
    [out] = s.postprocess(batch, [Choice([7], [None])])
    assert out.finish_reason == "length" and not s.has_work() and s.blocks.num_free == 16


def test_prefix_cache_skips_shared_blocks_and_a_short_pool_preempts_the_newest():
    s = scheduler(budget=64)
    first = sequence(0, list(range(9)))
    s.add(first)
    s.postprocess(s.schedule(), [Choice([50], [None])])  # blocks [0..3] and [4..7] are now keyed
    second = sequence(1, list(range(9)) + [60])
    s.add(second)
    [_, item] = s.schedule()
    assert item.seq is second and item.start == 8 and item.tokens == [8, 60] and second.cached_tokens == 8
    assert second.blocks[:2] == first.blocks[:2]  # shared, not copied

    s = scheduler(num_blocks=3, budget=64)
    old, new = sequence(0, list(range(8))), sequence(1, [5, 6, 7])
    s.add(old)
    s.add(new)
    s.postprocess(s.schedule(), [Choice([1], [None]), Choice([2], [None])])  # 2 + 1 blocks: the pool is full
    [item] = s.schedule()  # old's 9th token needs a block: the newest sequence gives its own back
    assert item.seq is old and s.preemptions == 1 and list(s.waiting) == [new] and new.num_computed == 0
    assert new.tokens == [5, 6, 7, 2]  # recomputed later from its prompt and output so far


def test_drafts_only_for_greedy_sequences_and_abort_frees_everything():
    class Drafter:
        forgotten: list[int] = []

        def propose(self, seq_id, tokens, k):
            return [tokens[-1] + 1 + i for i in range(k)]

        def forget(self, seq_id):
            self.forgotten.append(seq_id)

    s = scheduler(budget=64, drafter=Drafter(), num_draft=3)
    greedy = sequence(0, [1, 2, 3], params=SamplingParams(temperature=0.0))
    sampled = sequence(1, [1, 2, 3], params=SamplingParams(temperature=1.0), seed=0)
    s.add(greedy)
    s.add(sampled)
    s.postprocess(s.schedule(), [Choice([4], [None]), Choice([9], [None])])
    batch = s.schedule()
    assert [(i.tokens, i.drafts) for i in batch] == [([4, 5, 6, 7], [5, 6, 7]), ([9], [])]
    s.postprocess(batch, [Choice([5, 6, 0], [None] * 3, drafted=3, accepted=2), Choice([1], [None])])
    assert greedy.tokens == [1, 2, 3, 4, 5, 6, 0] and greedy.num_computed == 6  # the rejected draft is not cached
    [out] = s.abort("r0")
    assert out.finish_reason == "abort" and s.running == [sampled] and 0 in Drafter.forgotten
