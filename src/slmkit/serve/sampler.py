"""The tokens each sequence of a step gets, from the logits the runner computed.

A sequence without drafts gets one token: its request's logit bias, held-back stop tokens
(`min_tokens`), penalties and sampling settings applied to the logits of its last fed token, drawn
with its own generator, with logprobs when asked. A sequence with drafts (speculative decoding,
greedy only) keeps its drafts while they match the target model's greedy choice, then the
target's own token there, so the output is exactly greedy decoding. A sequence that asked for
prompt logprobs also gets those of the prompt tokens its step fed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from slmkit.generation.sampling import apply_penalties, choose
from slmkit.serve.sequence import Logprob, Request, SequenceState

if TYPE_CHECKING:
    from slmkit.serve.scheduler import Scheduled

log = logging.getLogger("slmkit.serve")


@dataclass
class Choice:
    """A sequence's new tokens from one step, and how many of its drafts were accepted."""

    tokens: list[int]
    logprobs: list[Logprob | None]
    drafted: int = 0
    accepted: int = 0
    failed: bool = False  # sampling raised: this sequence ends with finish_reason "error", the batch goes on
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # of the prompt tokens after `Scheduled.prompt_rows`


def sample(batch: list[Scheduled], logits: torch.Tensor | None, prompt_logits: torch.Tensor | None = None) -> list[Choice | None]:
    """One `Choice` per scheduled sequence (None while it is still prefilling and scores no prompt
    tokens). `logits` has a row per chosen position, in batch order: for each sampling sequence,
    its last fed token's and then one per draft; `prompt_logits` a row per `prompt_rows` offset,
    in batch order (`ModelRunner.run`)."""
    choices: list[Choice | None] = []
    at = prompt_at = 0
    for item in batch:
        scored = []
        if item.prompt_rows:
            rows = prompt_logits[prompt_at : prompt_at + len(item.prompt_rows)]
            prompt_at += len(item.prompt_rows)
            scored = prompt_logprobs(item, rows)
        if not item.samples:
            choices.append(Choice([], [], prompt_logprobs=scored) if scored else None)
            continue
        rows = logits[at : at + len(item.drafts) + 1]
        at += len(item.drafts) + 1
        try:
            choice = verify(item.drafts, rows) if item.drafts else next_token(item.seq, rows[0])
        except Exception:  # one sequence's failure ends that sequence, not the batch
            log.exception("sampling failed for %s; ending it with finish_reason 'error'", item.seq.request.request_id)
            choice = Choice([], [], failed=True)
        choice.prompt_logprobs = scored
        choices.append(choice)
    return choices


def prompt_logprobs(item: Scheduled, logits: torch.Tensor) -> list[Logprob]:
    """logits [len(prompt_rows), vocab] -> each next prompt token's logprob and the request's top-k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    first, end = item.start + item.prompt_rows.start + 1, item.start + item.prompt_rows.stop + 1
    targets = torch.tensor(item.seq.tokens[first:end], device=logits.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = item.seq.request.prompt_logprobs
    if not k:
        return [(lp, {}) for lp in chosen]
    top = torch.topk(logprobs, k)
    return [(lp, dict(zip(ids, values))) for lp, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist())]


def next_token(seq: SequenceState, logits: torch.Tensor) -> Choice:
    """logits [vocab] of the sequence's last token -> its next token, under its request's settings."""
    request, params = seq.request, seq.request.params
    raw = logits
    if request.logit_bias:
        ids = torch.tensor(list(request.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(request.logit_bias.values()), device=logits.device,
                                                       dtype=logits.dtype))
    if seq.holds_stops and seq.stop_tokens:
        logits = logits.index_fill(0, torch.tensor(sorted(seq.stop_tokens), device=logits.device), float("-inf"))
    if params.needs_history:
        vocab = logits.shape[-1]
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=logits.device)
        seen[0, seq.tokens] = True
        output = torch.tensor(seq.tokens[seq.prompt_len :], dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=vocab)[None]
        logits = apply_penalties(logits[None], seen, counts, params)[0]
    token = int(choose(logits[None], params, seq.generator)[0])
    return Choice([token], [logprob(request, raw, token)])


def logprob(request: Request, logits: torch.Tensor, token: int) -> Logprob | None:
    """The token's log-probability under the model (before penalties) and the request's top-k."""
    if request.logprobs is None:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, request.logprobs) if request.logprobs else None
    alternatives = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
    return float(logprobs[token]), alternatives


def verify(drafts: list[int], logits: torch.Tensor) -> Choice:
    """logits [len(drafts) + 1, vocab] after the last token and after each draft -> the drafts up
    to the first the target would not have chosen, then the target's token."""
    choices = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    tokens = drafts[:accepted] + [choices[accepted]]
    return Choice(tokens, [None] * len(tokens), len(drafts), accepted)
