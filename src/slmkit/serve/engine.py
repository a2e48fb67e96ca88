"""The serving engine: continuous batching over a paged KV cache, independent of HTTP.

Each `step` is one forward pass over a batch assembled anew:

1. Running sequences first, oldest first: one decode token each (plus drafted tokens under
   speculative decoding), or the next chunk of a prompt still being prefilled.
2. Then waiting requests, while the token budget (`max_batch_tokens`) and free KV blocks last;
   the beginning of a prompt found in the prefix cache is not computed again.
3. When a running sequence needs a block and none is free, the most recently admitted sequence is
   preempted: its blocks are freed and it waits to be recomputed from its tokens so far (prompt
   and output), which gives the same output since the recomputation is exact.

Requests join at any step and leave when done, so the batch never waits for its slowest member.
Calls from other threads (`submit`, `abort`, `run`) are queued and applied at the next step, so
only the thread that calls `step` touches the model and the cache.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from slmkit.errors import InputError
from slmkit.generation.sampling import SamplingParams, apply_penalties, choose
from slmkit.generation.text import TextStream
from slmkit.model.transformer import Transformer
from slmkit.serve.kv_pages import BlockManager, KVPool, PagedBatch, block_hash
from slmkit.serve.lora import MultiLoRA
from slmkit.serve.speculative import Drafter, HiddenStateDrafter
from slmkit.tokenizer import Tokenizer

log = logging.getLogger("slmkit.serve")


@dataclass
class Request:
    """What a client asks for. `stop_tokens` None means the tokenizer's end-of-text token;
    `logprobs` k returns each chosen token's log-probability and the k most likely ones."""

    prompt: list[int]
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_tokens: Sequence[int] | None = None
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    adapter: str | None = None
    request_id: str = ""


@dataclass
class Output:
    """New tokens of one completion (`index` < n) of a request, produced by one step."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[tuple[float, dict[int, float]]]  # per token: (its logprob, top alternatives)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last output
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


@dataclass(eq=False)  # compared by identity: the scheduler looks sequences up in its lists
class SequenceState:
    """One completion being generated: its tokens so far and where its keys/values live."""

    id: int
    request: Request
    index: int
    tokens: list[int]
    arrival: float
    generator: torch.Generator | None
    text: TextStream | None
    stop_tokens: frozenset[int]
    num_computed: int = 0  # tokens whose keys/values are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # keys of the leading full blocks
    cached_tokens: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len


class Engine:
    """Continuous-batching generation for one model. `num_blocks` defaults to room for
    `max_seqs` full-context sequences; `drafter` turns on speculative decoding of greedy requests
    (`DraftModel`, or `MTPDrafter` for a model with multi-token-prediction modules)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 512,
        max_seqs: int = 64,
        prefix_caching: bool = True,
        drafter: Drafter | None = None,
        num_draft: int = 4,
        adapters: dict[str, Any] | None = None,
    ) -> None:
        cfg = model.cfg
        if cfg.attention_kind != "mha":
            raise InputError(f"the serving engine's paged KV cache holds per-head keys and values; "
                             f"attention_kind={cfg.attention_kind!r} models cannot be served yet")
        self.model, self.tokenizer = model.eval(), tokenizer
        model.use_decoding_layout()
        self.context = cfg.context_length
        per_seq = -(-cfg.context_length // block_size)
        num_blocks = num_blocks or max_seqs * per_seq
        p = model.embed_tokens.weight
        self.pool = KVPool(cfg, num_blocks, block_size, p.device, p.dtype)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.block_size, self.max_batch_tokens, self.max_seqs = block_size, max_batch_tokens, max_seqs
        self.drafter, self.num_draft = drafter, num_draft
        self.lora = MultiLoRA(model, adapters) if adapters else None
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.ids = itertools.count()
        self.request_ids = itertools.count()
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed / kept
        self.generated = 0  # output tokens so far
        self.preemptions = 0

    # ------------------------------------------------------------------ requests
    def validate(self, request: Request) -> None:
        """Raise InputError for a request that can never be served."""
        if not request.prompt:
            raise InputError("the prompt is empty; give at least one token")
        if len(request.prompt) >= self.context:
            raise InputError(f"the prompt is {len(request.prompt)} tokens; this model's context is {self.context} tokens, "
                             "so the prompt must be shorter to leave room for output")
        if request.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, not {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.context:
            raise InputError(f"max_tokens {request.max_tokens} plus the prompt's {len(request.prompt)} tokens exceed "
                             f"the model's context of {self.context} tokens; lower max_tokens")
        if not 1 <= request.n <= self.max_seqs:
            raise InputError(f"n must be between 1 and {self.max_seqs}, not {request.n}")
        if request.seed is not None and not 0 <= request.seed <= 2**64 - request.n:  # completion i uses seed + i
            raise InputError(f"seed must be in [0, 2^64 - n], not {request.seed}")
        need = -(-(len(request.prompt) + request.max_tokens) // self.block_size)
        if need > self.blocks.num_blocks:
            raise InputError(f"the request needs {need} KV blocks; the pool has {self.blocks.num_blocks}")
        if request.adapter is not None and (self.lora is None or request.adapter not in self.lora.names):
            names = ", ".join(n for n in (self.lora.names if self.lora else []) if n) or "none"
            raise InputError(f"unknown adapter {request.adapter!r}; loaded: {names}")
        if request.logprobs is not None and not 0 <= request.logprobs <= 20:
            raise InputError(f"logprobs must be between 0 and 20, not {request.logprobs}")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise InputError(f"prompt token ids must be in [0, {vocab})")

    def submit(self, request: Request) -> str:
        """Queue a request (validated now, admitted at the next step); returns its id."""
        self.validate(request)
        request.request_id = request.request_id or f"req-{next(self.request_ids)}"
        self.inbox.put(lambda: self._admit(request))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its blocks return to the pool at the next step."""
        self.inbox.put(lambda: self._abort(request_id))

    def run(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the stepping thread between two steps (e.g. an embedding pass)."""
        future: Future = Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 -- handed to the caller
                future.set_exception(e)

        self.inbox.put(call)
        return future

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self.inbox.empty())

    def _admit(self, request: Request) -> None:
        stops = request.stop_tokens
        if stops is None:
            stops = [self.tokenizer.eot_id] if self.tokenizer is not None and self.tokenizer.eot_token else []
        for index in range(request.n):
            seed = None if request.seed is None else request.seed + index
            generator = torch.Generator(self.pool.k.device).manual_seed(seed) if seed is not None else None
            text = TextStream(self.tokenizer, request.stop) if self.tokenizer is not None else None
            self.waiting.append(SequenceState(next(self.ids), request, index, list(request.prompt), time.perf_counter(),
                                          generator, text, frozenset(stops)))

    def _abort(self, request_id: str) -> None:
        for seq in [s for s in (*self.running, *self.waiting) if s.request.request_id == request_id]:
            self._finish(seq, "abort")

    # ------------------------------------------------------------------ scheduling
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

    def _speculates(self, seq: SequenceState) -> bool:
        """Speculative decoding applies to greedy requests without penalties or logprobs."""
        params = seq.request.params
        return self.drafter is not None and params.greedy and not params.needs_history and not seq.request.logprobs

    def _drafts(self, seq: SequenceState) -> list[int]:
        request = seq.request
        if not self._speculates(seq):
            return []
        if self.lora is not None:  # drafters may share modules with the model: they draft with the base weights
            self.lora.rows = None
        k = min(self.num_draft, request.max_tokens - seq.num_output - 1, self.context - len(seq.tokens))
        return self.drafter.propose(seq.id, seq.tokens, k) if k > 0 else []

    def _schedule(self) -> list[tuple[SequenceState, int, list[int]]]:
        """(sequence, tokens to compute, drafts) for this step."""
        budget = self.max_batch_tokens
        scheduled: list[tuple[SequenceState, int, list[int]]] = []
        for seq in list(self.running):
            if seq not in self.running or budget <= 0:
                continue
            need = len(seq.tokens) - seq.num_computed
            drafts = self._drafts(seq) if need == 1 else []
            count = min(need + len(drafts), budget)
            drafts = drafts[: count - need] if count > need else []
            while not self._reserve(seq, seq.num_computed + count):
                victims = [s for s in self.running if s is not seq and all(s is not d for d, _, _ in scheduled)]
                self._preempt(victims[-1] if victims else seq)
                if not victims:
                    break
            if seq in self.running:
                scheduled.append((seq, count, drafts))
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not seq.blocks:
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
            scheduled.append((seq, count, []))
            budget -= count
        return scheduled

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Apply queued calls, schedule, run one forward pass, sample; return what is new."""
        self.outputs: list[Output] = []
        while not self.inbox.empty():
            self.inbox.get()()
        scheduled = self._schedule()
        if not scheduled:
            return self.outputs
        device = self.pool.k.device
        feeds = [seq.tokens[seq.num_computed : seq.num_computed + count - len(drafts)] + drafts
                 for seq, count, drafts in scheduled]
        width = max(len(f) for f in feeds)
        ids = torch.zeros(len(feeds), width, dtype=torch.long)
        for row, feed in enumerate(feeds):
            ids[row, : len(feed)] = torch.tensor(feed)
        batch = PagedBatch(self.pool, [s.blocks for s, _, _ in scheduled], [s.num_computed for s, _, _ in scheduled],
                           [len(f) for f in feeds])
        if self.lora is not None:
            self.lora.select([s.request.adapter for s, _, _ in scheduled])
        hidden = self.model(ids.to(device), cache=batch, return_hidden=True, positions=batch.positions)
        if isinstance(self.drafter, HiddenStateDrafter):  # before verification, which may end a sequence
            for row, ((seq, _, _), feed) in enumerate(zip(scheduled, feeds)):
                if self._speculates(seq):
                    self.drafter.observe(seq.id, seq.num_computed, self.model.mtp_hidden[row, : len(feed)])

        # logits only where a token is chosen: the last fed token, and every draft position
        picks: list[tuple[int, int]] = []  # (row, column)
        for row, ((seq, count, drafts), feed) in enumerate(zip(scheduled, feeds)):
            if seq.num_computed + len(feed) - len(drafts) == len(seq.tokens):
                picks += [(row, len(feed) - 1 - len(drafts) + j) for j in range(len(drafts) + 1)]
        logits = self._logits(hidden[[r for r, _ in picks], [c for _, c in picks]]) if picks else None

        at = 0
        for seq, count, drafts in scheduled:
            done_prefill = seq.num_computed + count - len(drafts) == len(seq.tokens)
            seq.num_computed += count - len(drafts)
            self._register_full_blocks(seq)
            if done_prefill and seq in self.running:
                rows = logits[at : at + len(drafts) + 1]
                at += len(drafts) + 1
                if drafts:
                    self._verify(seq, drafts, rows)
                else:
                    try:
                        token, logprob = self._sample(seq, rows[0])
                    except Exception:  # one sequence's failure ends that sequence, not the batch
                        log.exception("sampling failed for %s; ending it with finish_reason 'error'", seq.request.request_id)
                        self._finish(seq, "error")
                        continue
                    self._append(seq, [token], [logprob])
        return self.outputs

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        cap = self.model.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def _sample(self, seq: SequenceState, logits: torch.Tensor) -> tuple[int, tuple[float, dict[int, float]] | None]:
        request, params = seq.request, seq.request.params
        raw = logits
        if params.needs_history:
            vocab = logits.shape[-1]
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=logits.device)
            seen[0, seq.tokens] = True
            output = torch.tensor(seq.tokens[seq.prompt_len :], dtype=torch.long, device=logits.device)
            counts = torch.bincount(output, minlength=vocab)[None]
            logits = apply_penalties(logits[None], seen, counts, params)[0]
        token = int(choose(logits[None], params, seq.generator)[0])
        return token, self._logprob(request, raw, token)

    @staticmethod
    def _logprob(request: Request, logits: torch.Tensor, token: int) -> tuple[float, dict[int, float]] | None:
        if request.logprobs is None:
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, request.logprobs) if request.logprobs else None
        alternatives = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
        return float(logprobs[token]), alternatives

    def _verify(self, seq: SequenceState, drafts: list[int], logits: torch.Tensor) -> None:
        """Keep drafts while they match the target's greedy choice, then the target's token."""
        choices = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        seq.num_computed += accepted  # the accepted drafts' keys are valid; the rest are overwritten later
        self._register_full_blocks(seq)
        tokens = drafts[:accepted] + [choices[accepted]]
        self._append(seq, tokens, [None] * len(tokens))

    def _append(self, seq: SequenceState, tokens: list[int], logprobs: list) -> None:
        """Add chosen tokens to a sequence, ending it on a stop token, stop string or its limit."""
        out = Output(seq.request.request_id, seq.index, [], "", [], None, seq.prompt_len, seq.cached_tokens)
        reason = None
        for token, logprob in zip(tokens, logprobs):
            if token in seq.stop_tokens:
                reason = "stop"
                break
            seq.tokens.append(token)
            out.token_ids.append(token)
            if logprob is not None:
                out.logprobs.append(logprob)
            if seq.text is not None:
                out.text += seq.text.push(token)
                if seq.text.stopped:
                    reason = "stop"
                    break
            if seq.num_output >= seq.request.max_tokens or len(seq.tokens) >= self.context:
                reason = "length"
                break
        self.generated += len(out.token_ids)
        if reason is not None:
            if seq.text is not None:
                out.text += seq.text.finish()
            self._release(seq)
            out.finish_reason = reason
        self.outputs.append(out)

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

    def _finish(self, seq: SequenceState, reason: str) -> None:
        self._release(seq)
        self.outputs.append(Output(seq.request.request_id, seq.index, [], "", [], reason, seq.prompt_len, seq.cached_tokens))

    # ------------------------------------------------------------------ conveniences
    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    def stats(self) -> dict[str, float]:
        return {"waiting": len(self.waiting), "running": len(self.running), "kv_blocks_used": self.blocks.num_used,
                "kv_blocks_free": self.blocks.num_free, "prefix_cache_hit_rate": self.blocks.hit_rate,
                "generated_tokens": self.generated, "preemptions": self.preemptions}

    def generate(self, requests: Sequence[Request]) -> list[list[list[int]]]:
        """Run requests to completion on this thread: token ids per request, per completion."""
        ids = [self.submit(r) for r in requests]
        results = {rid: [[] for _ in range(r.n)] for rid, r in zip(ids, requests)}
        while self.has_work():
            for out in self.step():
                results[out.request_id][out.index] += out.token_ids
        return [results[rid] for rid in ids]

    @torch.inference_mode()
    def embed(self, prompts: Sequence[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states (base model), one vector per prompt; call on the
        stepping thread (the server does so through `run`)."""
        device = self.pool.k.device
        if self.lora is not None:
            self.lora.rows = None
        vectors = []
        for prompt in prompts:
            hidden = self.model(torch.tensor([prompt], device=device), return_hidden=True)[0]
            vectors.append(hidden.float().mean(dim=0).tolist())
        return vectors
