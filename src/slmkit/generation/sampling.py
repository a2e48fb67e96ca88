"""Logits processors: turn the model's next-token logits [B, V] into a choice of token.

Order (as in Hugging Face and vLLM): penalties on the raw logits, then temperature, then the
filters top-k -> top-p -> min-p, each of which sets the logits it removes to -inf so that a final
softmax renormalizes over what is left. Temperature 0 means greedy (argmax after penalties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slmkit.errors import InputError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p (nucleus)
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # CTRL: divide positive / multiply negative logits of seen tokens
    frequency_penalty: float = 0.0  # OpenAI: subtract this times the token's count in the output
    presence_penalty: float = 0.0  # OpenAI: subtract this once if the token is in the output

    def __post_init__(self) -> None:
        """Ranges as OpenAI documents them (temperature [0, 2], penalties [-2, 2]); every number finite."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InputError(f"{name} must be a finite number, not {value!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise InputError(f"top_k must be an integer, not {self.top_k!r}")
        checks = [
            (0 <= self.temperature <= 2, f"temperature must be >= 0 and <= 2, not {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, not {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], not {self.top_p}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], not {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, not {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], not {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], not {self.presence_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """seen [B, V] bool: tokens of prompt or output (repetition penalty, as in vLLM);
    counts [B, V]: how often each token occurs in the output so far (frequency/presence)."""
    if params.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    counts = counts.to(logits.dtype)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept too)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their total probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature and filters; softmax of the result is the sampling distribution."""
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p:
        logits = min_p_filter(logits, params.min_p)
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from (penalties already applied)."""
    return torch.softmax(filtered_logits(logits, params), dim=-1)


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits (penalties applied) -> [B] token ids: argmax when greedy, else a draw.

    Never raises on non-finite numbers: NaN logits count as -inf, and a row whose distribution
    is not finite (a temperature so small or a penalty so large that the division overflows)
    takes its argmax, the limit of that distribution."""
    logits = logits.masked_fill(logits.isnan(), float("-inf"))
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    broken = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
    if broken.any():
        argmax = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(probs.dtype)
        probs = torch.where(broken[:, None], argmax, probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
