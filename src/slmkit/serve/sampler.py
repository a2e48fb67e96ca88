"""The tokens each sequence of a step gets, from the logits the runner computed.

A sequence without drafts gets one token: its request's penalties and sampling settings applied
to the logits of its last fed token, drawn with its own generator, with logprobs when asked. A
sequence with drafts (speculative decoding, greedy only) keeps its drafts while they match the
target model's greedy choice, then the target's own token there, so the output is exactly
greedy decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


def sample(batch: list[Scheduled], logits: torch.Tensor | None) -> list[Choice | None]:
    """One `Choice` per scheduled sequence (None while it is still prefilling). `logits` has a row
    per chosen position, in batch order: for each sampling sequence, its last fed token's and then
    one per draft (`ModelRunner.run`)."""
    choices: list[Choice | None] = []
    at = 0
    for item in batch:
        if not item.samples:
            choices.append(None)
            continue
        rows = logits[at : at + len(item.drafts) + 1]
        at += len(item.drafts) + 1
        try:
            choices.append(verify(item.drafts, rows) if item.drafts else next_token(item.seq, rows[0]))
        except Exception:  # one sequence's failure ends that sequence, not the batch
            log.exception("sampling failed for %s; ending it with finish_reason 'error'", item.seq.request.request_id)
            choices.append(Choice([], [], failed=True))
    return choices


def next_token(seq: SequenceState, logits: torch.Tensor) -> Choice:
    """logits [vocab] of the sequence's last token -> its next token, under its request's settings."""
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
