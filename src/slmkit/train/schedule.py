"""Learning rate: linear warmup from ~0, then cosine decay to a floor (nanoGPT's schedule)."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based). Warmup avoids early divergence while Adam's
    moment estimates are still noise; decaying to `min_lr` (not 0) keeps the last steps useful."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def derived_warmup(max_steps: int, default: int) -> int:
    """The warmup of a run that names none: `default`, but at most 10% of the run, so that a short
    run still spends most of its steps near the peak LR (warmup 100 of 40 steps never gets there)."""
    return max(1, min(default, max_steps // 10))
