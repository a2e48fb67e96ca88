"""Logits processors on distributions whose answers are known by hand."""

from __future__ import annotations

import pytest
import torch

from slmkit.errors import InputError
from slmkit.generation.sampling import (
    SamplingParams,
    apply_penalties,
    choose,
    probabilities,
)

PROBS = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
LOGITS = PROBS.log()


def kept(params: SamplingParams) -> torch.Tensor:
    return probabilities(LOGITS, params)


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0), [0.1, 0.4, 0.2, 0.3]),
        (SamplingParams(temperature=1.0, top_k=1), [0, 1, 0, 0]),
        (SamplingParams(temperature=1.0, top_k=2), [0, 0.4 / 0.7, 0, 0.3 / 0.7]),
        (SamplingParams(temperature=1.0, top_k=10), [0.1, 0.4, 0.2, 0.3]),
        (SamplingParams(temperature=1.0, top_p=0.3), [0, 1, 0, 0]),  # the top token alone reaches 0.3
        (SamplingParams(temperature=1.0, top_p=0.5), [0, 0.4 / 0.7, 0, 0.3 / 0.7]),
        (SamplingParams(temperature=1.0, top_p=0.75), [0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9]),
        (SamplingParams(temperature=1.0, top_p=1.0), [0.1, 0.4, 0.2, 0.3]),
        (SamplingParams(temperature=1.0, min_p=0.6), [0, 0.4 / 0.7, 0, 0.3 / 0.7]),  # threshold 0.24
        (SamplingParams(temperature=1.0, min_p=0.3), [0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9]),  # threshold 0.12
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.5), [0, 0.4 / 0.7, 0, 0.3 / 0.7]),
    ],
)
def test_filters_keep_the_expected_set_renormalized(params, expected):
    assert torch.allclose(kept(params), torch.tensor([expected], dtype=torch.float32), atol=1e-6)


def test_temperature_sharpens_and_flattens():
    sharp = probabilities(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(sharp, PROBS**2 / (PROBS**2).sum(), atol=1e-6)
    flat = probabilities(LOGITS, SamplingParams(temperature=1e6))
    assert torch.allclose(flat, torch.full((1, 4), 0.25), atol=1e-4)


def test_penalties_on_known_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0, 1, 2, 0]])
    rep = apply_penalties(logits, seen, counts, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -2.0, 0.5, 0.0]]
    freq = apply_penalties(logits, seen, counts, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0))
    assert freq.tolist() == [[2.0, -1.0 - 0.5 - 1.0, 0.5 - 1.0 - 1.0, 0.0]]


def test_greedy_is_argmax_and_sampling_follows_the_filtered_distribution():
    assert choose(LOGITS, SamplingParams()).tolist() == [1]
    generator = torch.Generator().manual_seed(0)
    draws = choose(LOGITS.expand(4000, 4), SamplingParams(temperature=1.0, top_k=2), generator)
    share = torch.bincount(draws, minlength=4).float() / 4000
    assert share[0] == share[2] == 0
    assert abs(share[1] - 0.4 / 0.7) < 0.03


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"repetition_penalty": 0}])
def test_bad_settings_are_input_errors(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad)
