"""What the one training loop asks of an objective, and what one micro-batch's loss brings back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from slmkit.model.transformer import ModelOutput


@dataclass
class StepLoss:
    """One micro-batch's loss, and the training forward it came from. The loop adds that forward's
    own terms (MoE balance loss, MTP loss against `targets`) and gives its expert load to the
    router's bias update, so no objective computes them itself and none can forget them."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    forward: ModelOutput | None = None  # the trained model's forward (None: it ran none worth adding)
    targets: torch.Tensor | None = None  # that forward's next tokens, for the MTP term (None: none)


class Objective(Protocol):
    name: str
    metric: str
    higher_is_better: bool

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss: ...
    def evaluate(self, model: nn.Module, examples: Sequence[Any]) -> dict[str, float]: ...
