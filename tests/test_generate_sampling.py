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
    flat = probabilities(LOGITS, SamplingParams(temperature=2.0))  # OpenAI's upper bound
    assert torch.allclose(flat, PROBS**0.5 / (PROBS**0.5).sum(), atol=1e-6)


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


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -1}, "temperature must be >= 0 and <= 2, not -1"),
    ({"temperature": 2.5}, "temperature must be >= 0 and <= 2, not 2.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number, not nan"),
    ({"top_k": 0}, "top_k must be >= 1, not 0"),
    ({"top_k": 2.5}, "top_k must be an integer, not 2.5"),
    ({"top_p": 0}, "top_p must be in (0, 1], not 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], not 1.5"),
    ({"min_p": 2}, "min_p must be in [0, 1], not 2"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0, not 0"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, not inf"),
    ({"presence_penalty": -1e300}, "presence_penalty must be in [-2, 2], not -1e+300"),
    ({"frequency_penalty": 1e300}, "frequency_penalty must be in [-2, 2], not 1e+300"),
    ({"frequency_penalty": True}, "frequency_penalty must be a finite number, not True"),
])
def test_bad_settings_are_input_errors(bad, message):
    with pytest.raises(InputError) as e:
        SamplingParams(**bad)
    assert str(e.value) == message


@pytest.mark.parametrize("logits, params, allowed", [
    (LOGITS / 1e-320, SamplingParams(temperature=1.0), {0}),  # all -inf: the first token
    (LOGITS, SamplingParams(temperature=1e-320), {1}),  # the division by the temperature overflows: argmax
    (torch.tensor([[float("nan"), 0.0, 1.0, float("nan")]]), SamplingParams(temperature=1.0), {1, 2}),  # NaN is -inf
    (torch.tensor([[float("inf"), 0.0, 1.0, -float("inf")]]), SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1), {0}),
    (torch.full((1, 4), float("-inf")), SamplingParams(temperature=1.0, top_k=2), {0}),
])
def test_non_finite_rows_never_raise_and_never_disturb_their_batch(logits, params, allowed):
    healthy = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    batch = torch.cat([logits, healthy])
    draws = [choose(batch, params, torch.Generator().manual_seed(seed)).tolist() for seed in range(40)]
    assert {token for token, _ in draws} <= allowed
    assert {other for _, other in draws} <= {0, 1, 2, 3}  # the healthy row still samples


def test_huge_repetition_penalty_samples_finite_choices():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.ones(1, 4, dtype=torch.bool)
    params = SamplingParams(temperature=1.0, repetition_penalty=1e300)
    penalized = apply_penalties(logits, seen, torch.zeros(1, 4, dtype=torch.long), params)
    assert choose(penalized, params, torch.Generator().manual_seed(0)).tolist()[0] in (0, 2, 3)
