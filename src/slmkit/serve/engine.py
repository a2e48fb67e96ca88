"""The serving engine: continuous batching over a paged KV cache, independent of HTTP.

Each `step` is one forward pass over a batch assembled anew:

    batch   = scheduler.schedule()             which sequences run, how many tokens each (scheduler.py)
    result  = runner.run(batch)                one forward pass over the paged KV pool     (runner.py)
    choices = sample(batch, result.logits)     next tokens; drafts verified                (sampler.py)
    outputs = scheduler.postprocess(batch, choices)    append, stop, free blocks           (scheduler.py)

Requests join at any step and leave when done, so the batch never waits for its slowest member.
Calls from other threads (`submit`, `abort`, `run`) are queued and applied at the next step, so
only the thread that calls `step` touches the model and the cache.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from slmkit.devices import available_memory
from slmkit.errors import InputError
from slmkit.model.transformer import Transformer
from slmkit.serve.adapters import MultiLoRA
from slmkit.serve.kv_pages import BlockManager, plan_pool
from slmkit.serve.runner import ModelRunner, StepResult
from slmkit.serve.sampler import sample
from slmkit.serve.scheduler import Scheduled, Scheduler
from slmkit.serve.sequence import Output, Request, SequenceState
from slmkit.serve.speculative import Drafter, HiddenStateDrafter
from slmkit.tokenizer import Tokenizer

__all__ = ["Engine", "Output", "Request"]

log = logging.getLogger("slmkit.serve")


class Engine:
    """Continuous-batching generation for one model. The KV pool holds `num_blocks` blocks, or
    as many as `kv_memory` (a fraction of the memory left on the model's device, or an amount;
    see `plan_pool`) allows, up to `max_seqs` sequences of `max_context` tokens (default: the
    model's context; never more than the pool holds). `drafter` turns on speculative decoding of
    greedy requests (`DraftModel`, or `MTPDrafter` for a model with multi-token-prediction modules)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        num_blocks: int | None = None,
        kv_memory: float | str | None = None,
        max_context: int | None = None,
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
        self.lora = MultiLoRA(model, adapters) if adapters else None
        weight = model.embed_tokens.weight  # the pool takes the model's device and dtype
        self.pool_plan = plan_pool(cfg, weight.dtype, available_memory(weight.device), device_type=weight.device.type,
                                   kv_memory=kv_memory, num_blocks=num_blocks, block_size=block_size,
                                   max_seqs=max_seqs, max_context=max_context)
        log.info(self.pool_plan.describe())
        self.context, self.block_size, self.max_seqs = self.pool_plan.context, block_size, max_seqs
        self.runner = ModelRunner(model, self.pool_plan.num_blocks, block_size, self.lora)
        self.scheduler = Scheduler(BlockManager(self.pool_plan.num_blocks, block_size, prefix_caching), max_batch_tokens,
                                   max_seqs, self.context, drafter, num_draft)
        self.drafter = drafter
        # decided once: isinstance on a runtime-checkable Protocol costs ~60 us, more than a decode step's bookkeeping
        self.hidden_drafter = drafter if isinstance(drafter, HiddenStateDrafter) else None
        self.inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.finished: deque[Output] = deque()  # outputs of aborted requests, for the next step
        self.ids = itertools.count()
        self.request_ids = itertools.count()
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed / kept
        self.generated = 0  # output tokens so far

    # ------------------------------------------------------------------ requests
    def validate(self, request: Request) -> None:
        """Raise InputError for a request that can never be served."""
        if not request.prompt:
            raise InputError("the prompt is empty; give at least one token")
        name, why = "the model's context", ""
        if self.context < self.model.cfg.context_length:
            name, why = "the served context", (f" (the model's is {self.model.cfg.context_length}; --max-context or the "
                                               "KV cache's size limits it)")
        if len(request.prompt) >= self.context:
            raise InputError(f"the prompt is {len(request.prompt)} tokens; {name} is {self.context} tokens{why}, "
                             "so the prompt must be shorter to leave room for output")
        if request.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, not {request.max_tokens}")
        if len(request.prompt) + request.max_tokens > self.context:
            raise InputError(f"max_tokens {request.max_tokens} plus the prompt's {len(request.prompt)} tokens exceed "
                             f"{name} of {self.context} tokens{why}; lower max_tokens")
        if not 1 <= request.n <= self.max_seqs:
            raise InputError(f"n must be between 1 and {self.max_seqs}, not {request.n}")
        if request.seed is not None and not 0 <= request.seed <= 2**64 - request.n:  # completion i uses seed + i
            raise InputError(f"seed must be in [0, 2^64 - n], not {request.seed}")
        if request.adapter is not None and (self.lora is None or request.adapter not in self.lora.names):
            names = ", ".join(n for n in (self.lora.names if self.lora else []) if n) or "none"
            raise InputError(f"unknown adapter {request.adapter!r}; loaded: {names}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= 20:
                raise InputError(f"{name} must be between 0 and 20, not {k}")
        if not 0 <= request.min_tokens <= request.max_tokens:
            raise InputError(f"min_tokens must be between 0 and max_tokens ({request.max_tokens}), not {request.min_tokens}")
        vocab = self.model.cfg.vocab_size
        for name, ids in (("prompt", request.prompt), ("stop_token_ids", request.stop_token_ids),
                          ("logit_bias", request.logit_bias)):
            if any(not 0 <= t < vocab for t in ids):
                raise InputError(f"{name} token ids must be in [0, {vocab})")
        if any(not -100 <= b <= 100 for b in request.logit_bias.values()):
            raise InputError("logit_bias values must be between -100 and 100")

    def submit(self, request: Request) -> str:
        """Queue a request (validated now, admitted at the next step); returns its id."""
        self.validate(request)
        request.request_id = request.request_id or f"req-{next(self.request_ids)}"
        self.inbox.put(lambda: self._admit(request))
        return request.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its blocks return to the pool at the next step."""
        self.inbox.put(lambda: self.finished.extend(self.scheduler.abort(request_id)))

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
        return self.scheduler.has_work() or not self.inbox.empty()

    def _admit(self, request: Request) -> None:
        for index in range(request.n):
            self.scheduler.add(SequenceState.start(next(self.ids), request, index, self.tokenizer, self.runner.device))

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Apply queued calls, then schedule -> run -> sample -> postprocess; return what is new.

        A forward pass that raises is run again sequence by sequence, so only a sequence that
        fails on its own ends (finish_reason "error"); the others lose nothing, since rerunning
        their tokens rewrites the same cache slots."""
        while not self.inbox.empty():
            self.inbox.get()()
        outputs = list(self.finished)
        self.finished.clear()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        try:
            parts = [(batch, self.runner.run(batch))]
        except Exception:  # noqa: BLE001 -- isolated: only a sequence that fails alone ends
            if len(batch) == 1:
                return outputs + [self._fail(batch[0])]
            parts = self._run_one_by_one(batch, outputs)
        for part, result in parts:
            self._observe(part, result.last_hidden)
            choices = sample(part, result.logits, result.prompt_logits)
            outputs += self.scheduler.postprocess(part, choices)
            self.drafted += sum(c.drafted for c in choices if c is not None)
            self.accepted += sum(c.accepted for c in choices if c is not None)
        self.generated += sum(len(out.token_ids) for out in outputs)
        return outputs

    def _run_one_by_one(self, batch: list[Scheduled], outputs: list[Output]) -> list[tuple[list[Scheduled], StepResult]]:
        """After a failed forward pass over `batch`: each sequence alone; those that fail again end."""
        log.exception("a forward pass over %d sequences failed; running them one by one", len(batch))
        parts = []
        for item in batch:
            try:
                parts.append(([item], self.runner.run([item])))
            except Exception:  # noqa: BLE001 -- this sequence fails on its own
                outputs.append(self._fail(item))
        return parts

    def _fail(self, item: Scheduled) -> Output:
        log.exception("the sequence of request %s failed; ending it with finish_reason 'error'", item.seq.request.request_id)
        return self.scheduler.fail(item.seq)

    def _observe(self, batch: list[Scheduled], last_hidden: torch.Tensor) -> None:
        """Hand an MTP drafter the hidden states it drafts from (before verification may end a sequence)."""
        if self.hidden_drafter is not None:
            for row, item in enumerate(batch):
                if item.seq.can_speculate:
                    self.hidden_drafter.observe(item.seq.id, item.start, last_hidden[row, : len(item.tokens)])

    # ------------------------------------------------------------------ state and conveniences
    @property
    def waiting(self) -> deque[SequenceState]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[SequenceState]:
        return self.scheduler.running

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

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

    def embed(self, prompts: Sequence[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states (base model), one vector per prompt; call on the
        stepping thread (the server does so through `run`)."""
        return self.runner.embed(prompts)
