"""Causal language modeling: predict token t+1 from tokens up to t."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LanguageModeling:
    name = "lm"

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's (window[:-1], window[1:]) already are (inputs, targets)."""
        return x, y

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 (a bf16 log-softmax over the vocabulary loses precision)."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
