"""Which sequences run in a step and how many tokens each computes; what their results change.

`schedule` assembles each step's batch anew:

1. Running sequences first, oldest first: one decode token each (plus drafted tokens under
   speculative decoding), or the next chunk of a prompt still being prefilled.
2. Then waiting sequences, while the token budget (`max_batch_tokens`) and free KV blocks last;
   the beginning of a prompt found in the prefix cache is not computed again.
3. When a running sequence needs a block and none is free, the most recently admitted sequence is
   preempted: its blocks are freed and it waits to be recomputed from its tokens so far (prompt
   and output), which gives the same output since the recomputation is exact.

`postprocess` takes the tokens chosen for the batch: it counts what is now in the cache, keys
full blocks for the prefix cache, appends the tokens and frees the sequences that finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from slmkit.serve.kv_pages import BlockManager, block_hash
from slmkit.serve.sampler import Choice
from slmkit.serve.sequence import Output, SequenceState
from slmkit.serve.speculative import Drafter


@dataclass
class Scheduled:
    """One sequence's share of a step: the tokens it feeds, starting at position `start`
    (its tokens already in the cache): its next uncomputed tokens, then its `drafts`."""

    seq: SequenceState
    start: int
    tokens: list[int]
    drafts: list[int]
    samples: bool  # the sequence's last token is fed: the step chooses its next token(s)
    prompt_rows: range = range(0)  # offsets in `tokens` whose logits score the prompt token after them


class Scheduler:
    """The waiting queue and the running batch over one pool of KV blocks. A `drafter` proposes
    up to `num_draft` tokens for each decoding sequence that can take them."""

    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_seqs: int, context: int,
                 drafter: Drafter | None = None, num_draft: int = 4) -> None:
        self.blocks, self.block_size = blocks, blocks.block_size
        self.max_batch_tokens, self.max_seqs, self.context = max_batch_tokens, max_seqs, context
        self.drafter, self.num_draft = drafter, num_draft
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.preemptions = 0

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Output]:
        """End every completion of a request wherever it is; their final outputs."""
        aborted = [s for s in (*self.running, *self.waiting) if s.request.request_id == request_id]
        for seq in aborted:
            self._release(seq)
        return [seq.output("abort") for seq in aborted]

    def fail(self, seq: SequenceState) -> Output:
        """End a completion whose step failed: its blocks are freed, its final output says "error"."""
        self._release(seq)
        return seq.output("error")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> list[Scheduled]:
        budget = self.max_batch_tokens
        batch: list[Scheduled] = []
        for seq in list(self.running):
            if seq not in self.running or budget <= 0:
                continue
            need = len(seq.tokens) - seq.num_computed
            drafts = self._drafts(seq) if need == 1 else []
            count = min(need + len(drafts), budget)
            drafts = drafts[: count - need] if count > need else []
            while not self._reserve(seq, seq.num_computed + count):
                victims = [s for s in self.running if s is not seq and all(s is not d.seq for d in batch)]
                self._preempt(victims[-1] if victims else seq)
                if not victims:
                    break
            if seq in self.running:
                batch.append(self._scheduled(seq, count, drafts))
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not seq.blocks and not seq.needs_prompt_logprobs:  # cached blocks have no logits to score the prompt with
                seq.blocks, seq.hashes = self.blocks.match_prefix(seq.tokens, seq.request.adapter or "")
                seq.num_computed = len(seq.blocks) * self.block_size
                seq.cached_tokens = max(seq.cached_tokens, min(seq.num_computed, seq.prompt_len))
            count = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + count):
                self.blocks.release(seq.blocks)  # it waits until running sequences free blocks
                seq.blocks, seq.hashes, seq.num_computed = [], [], 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append(self._scheduled(seq, count, []))
            budget -= count
        return batch

    @staticmethod
    def _scheduled(seq: SequenceState, count: int, drafts: list[int]) -> Scheduled:
        start, own = seq.num_computed, count - len(drafts)
        rows = range(0)
        if seq.needs_prompt_logprobs:  # position p scores prompt token p + 1; those already scored are skipped
            first = max(start, len(seq.prompt_logprobs) - 1)
            rows = range(first - start, min(start + own, seq.prompt_len - 1) - start)
        return Scheduled(seq, start, seq.tokens[start : start + own] + drafts, drafts, start + own == len(seq.tokens), rows)

    def _drafts(self, seq: SequenceState) -> list[int]:
        if self.drafter is None or not seq.can_speculate:
            return []
        k = min(self.num_draft, seq.request.max_tokens - seq.num_output - 1, self.context - len(seq.tokens))
        return self.drafter.propose(seq.id, seq.tokens, k) if k > 0 else []

    def _reserve(self, seq: SequenceState, length: int) -> bool:
        """Give `seq` blocks for its first `length` tokens; False if the pool is short."""
        need = -(-length // self.block_size) - len(seq.blocks)
        if need > self.blocks.num_free:
            return False
        seq.blocks += [self.blocks.allocate() for _ in range(need)]
        return True

    def _preempt(self, seq: SequenceState) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        if self.drafter is not None:
            self.drafter.forget(seq.id)

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, batch: list[Scheduled], choices: list[Choice | None]) -> list[Output]:
        """Apply a step's chosen tokens (None for a sequence still prefilling); what is new."""
        outputs = []
        for item, choice in zip(batch, choices):
            seq = item.seq
            # fed tokens are now in the cache; of the drafts, only the accepted ones are valid
            seq.num_computed = item.start + len(item.tokens) - len(item.drafts) + (choice.accepted if choice else 0)
            self._register_full_blocks(seq)
            if choice is None:
                continue
            seq.prompt_logprobs += choice.prompt_logprobs
            if not item.samples:
                continue
            out = seq.output("error") if choice.failed else seq.append(choice.tokens, choice.logprobs, self.context)
            if out.finish_reason is not None:
                self._release(seq)
            outputs.append(out)
        return outputs

    def _register_full_blocks(self, seq: SequenceState) -> None:
        """Key every block whose tokens are all computed, so later prompts can share it."""
        bs = self.block_size
        for i in range(len(seq.hashes), min(seq.num_computed, len(seq.tokens)) // bs):
            parent = seq.hashes[-1] if seq.hashes else b""
            seq.hashes.append(block_hash(parent, seq.tokens[i * bs : (i + 1) * bs], seq.request.adapter or ""))
            self.blocks.register(seq.blocks[i], seq.hashes[-1])

    def _release(self, seq: SequenceState) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.drafter is not None:
            self.drafter.forget(seq.id)
