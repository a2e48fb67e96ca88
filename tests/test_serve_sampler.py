"""The sampler on its own: hand-made logits in, tokens, logprobs and verified drafts out."""

from __future__ import annotations

import pytest
import torch

from slmkit.generation.sampling import SamplingParams
from slmkit.serve.sampler import Choice, next_token, sample, verify
from slmkit.serve.scheduler import Scheduled
from slmkit.serve.sequence import Request, SequenceState


def sequence(prompt: list[int], **kw) -> SequenceState:
    return SequenceState.start(0, Request(prompt, stop_tokens=[], **kw), 0, None, torch.device("cpu"))


def one_hot_rows(tokens: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), tokens] = 5.0
    return logits


def test_drafts_are_kept_up_to_the_first_the_target_would_not_choose():
    # the target's greedy tokens after the last token and after each of 3 drafts: 2, 3, 6, 1
    logits = one_hot_rows([2, 3, 6, 1])
    assert verify([2, 3, 4], logits) == Choice([2, 3, 6], [None] * 3, drafted=3, accepted=2)
    assert verify([2, 3, 6], logits) == Choice([2, 3, 6, 1], [None] * 4, drafted=3, accepted=3)
    assert verify([5, 3, 6], logits) == Choice([2], [None], drafted=3, accepted=0)


def test_next_token_applies_penalties_and_reports_logprobs_before_them():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    seq = sequence([1, 1], logprobs=2, params=SamplingParams(temperature=0.0))
    choice = next_token(seq, logits)
    expected = torch.log_softmax(logits, dim=-1)
    assert choice.tokens == [1]
    [(chosen, top)] = choice.logprobs
    assert chosen == pytest.approx(expected[1].item(), rel=1e-6) and list(top) == [1, 2]
    assert list(top.values()) == pytest.approx(expected[[1, 2]].tolist(), rel=1e-6)
    penalized = sequence([1, 1, 1], params=SamplingParams(temperature=0.0, presence_penalty=0.5))
    penalized.tokens.append(1)  # an output token: presence penalties count output tokens only
    assert next_token(penalized, logits).tokens == [2] and next_token(penalized, logits).logprobs == [None]


def test_logit_rows_map_to_the_batch_in_order():
    prefilling, plain, drafting = sequence([1, 2, 3, 4]), sequence([1]), sequence([2])
    batch = [Scheduled(prefilling, 0, [1, 2], [], samples=False), Scheduled(plain, 0, [1], [], samples=True),
             Scheduled(drafting, 0, [2, 4, 5], [4, 5], samples=True)]
    choices = sample(batch, one_hot_rows([7, 4, 5, 0]))  # plain's row, then drafting's three rows
    assert choices == [None, Choice([7], [None]), Choice([4, 5, 0], [None] * 3, drafted=2, accepted=2)]
