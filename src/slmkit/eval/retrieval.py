"""Ranking metrics over relevance judgements: Recall@k, MRR@k and nDCG@k (binary relevance), with
percentile-bootstrap confidence intervals over questions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return next((1.0 / rank for rank, item in enumerate(ranked[:k], 1) if item in relevant), 0.0)


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], 1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal if ideal else 0.0


METRICS: dict[str, Callable[[Sequence[str], set[str]], float]] = {
    "recall@1": lambda r, rel: recall_at(r, rel, 1),
    "recall@5": lambda r, rel: recall_at(r, rel, 5),
    "recall@10": lambda r, rel: recall_at(r, rel, 10),
    "recall@20": lambda r, rel: recall_at(r, rel, 20),
    "mrr@10": lambda r, rel: mrr_at(r, rel, 10),
    "ndcg@10": lambda r, rel: ndcg_at(r, rel, 10),
}


def per_question(rankings: Sequence[Sequence[str]], judgements: Sequence[set[str]]) -> dict[str, np.ndarray]:
    """Each metric's value for each question."""
    return {name: np.array([f(r, rel) for r, rel in zip(rankings, judgements)]) for name, f in METRICS.items()}


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    if len(values) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
