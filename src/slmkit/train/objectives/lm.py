"""Causal language modeling: predict token t+1 from tokens up to t (and, with MTP modules, t+2 ...)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.train.objectives.protocol import StepLoss

IGNORE = -100
Window = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets) of one row


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 (a bf16 log-softmax over the vocabulary loses precision);
    IGNORE targets do not count."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def collate_windows(windows: Sequence[Window]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([w[0] for w in windows]), "targets": torch.stack([w[1] for w in windows])}


@torch.no_grad()
def mean_token_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss per counted target token over `batches`, and its perplexity."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        targets = batch["targets"].to(device)
        logits = model(batch["input_ids"].to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    loss = total / max(1, count)
    return {"loss": loss, "ppl": math.exp(min(loss, 700))}


class LanguageModeling:
    name = "lm"
    metric = "loss"
    higher_is_better = False

    def __init__(self, eval_batch_size: int = 8) -> None:
        self.eval_batch_size = eval_batch_size

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's (window[:-1], window[1:]) already are (inputs, targets)."""
        return x, y

    def collate(self, windows: Sequence[Window]) -> dict[str, torch.Tensor]:
        return collate_windows(windows)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        output = model(batch["input_ids"], targets=batch["targets"])
        return StepLoss(next_token_loss(output.logits, batch["targets"]), {}, output, batch["targets"])

    def evaluate(self, model: nn.Module, windows: Sequence[Window]) -> dict[str, float]:
        n = self.eval_batch_size
        return mean_token_loss(model, [self.collate(windows[i : i + n]) for i in range(0, len(windows), n)])


def multi_token_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over depths k = 1..D of the cross-entropy of depth k's logits at positions 0..T-k-1
    against the tokens k + 1 ahead, targets[:, k:] (-100 targets are ignored)."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        future = targets[:, k:]
        losses.append(F.cross_entropy(logits[:, : future.shape[1]].float().flatten(0, 1), future.flatten()))
    return torch.stack(losses).mean()
