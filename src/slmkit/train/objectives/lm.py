"""Causal language modeling: predict token t+1 from tokens up to t (and, with MTP modules, t+2 ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmkit.model.transformer import ModelOutput


class LanguageModeling:
    name = "lm"

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's (window[:-1], window[1:]) already are (inputs, targets)."""
        return x, y

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 (a bf16 log-softmax over the vocabulary loses precision)."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def extra_loss(self, model: torch.nn.Module, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor | None:
        """What a training forward (`model(inputs, targets=targets)`) adds to the loss: the MoE
        balance loss and mtp_loss_weight * `multi_token_loss` (None for a dense model without MTP)."""
        terms = [output.aux_loss] if output.aux_loss is not None else []
        if output.mtp_logits:
            terms.append(model.cfg.mtp_loss_weight * multi_token_loss(output.mtp_logits, targets))
        return sum(terms) if terms else None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def multi_token_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Mean over depths k = 1..D of the cross-entropy of depth k's logits at positions 0..T-k-1
    against the tokens k + 1 ahead, targets[:, k:] (-100 targets are ignored)."""
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        future = targets[:, k:]
        losses.append(F.cross_entropy(logits[:, : future.shape[1]].float().flatten(0, 1), future.flatten()))
    return torch.stack(losses).mean()
