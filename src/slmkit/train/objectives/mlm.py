"""Masked language modeling (BERT): hide 15% of tokens and predict them from both sides.

Of the chosen positions, 80% become the mask token, 10% a random token and 10% stay as they
are, so the model cannot learn that only mask tokens need predicting. The tokenizer has no
dedicated mask token; `<|pad|>` serves as one (it never occurs inside training windows).
Loss is counted on the chosen positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmkit.model.transformer import ModelOutput

IGNORE = -100


class MaskedLanguageModeling:
    name = "mlm"

    def __init__(self, mask_id: int, vocab_size: int, seed: int = 0, rate: float = 0.15) -> None:
        self.mask_id, self.vocab_size, self.rate = mask_id, vocab_size, rate
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        chosen = torch.rand(x.shape, generator=g) < self.rate
        targets = torch.where(chosen, x, IGNORE)
        roll = torch.rand(x.shape, generator=g)
        random_tokens = torch.randint(self.vocab_size, x.shape, generator=g)
        inputs = torch.where(chosen & (roll < 0.8), self.mask_id, x)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
        return inputs, targets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def extra_loss(self, model: torch.nn.Module, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor | None:
        """The MoE balance loss of a training forward, if any."""
        return output.aux_loss

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
