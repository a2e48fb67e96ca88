"""Masked language modeling (BERT): hide 15% of tokens and predict them from both sides.

Of the chosen positions, 80% become the mask token, 10% a random token and 10% stay as they
are, so the model cannot learn that only mask tokens need predicting. The tokenizer has no
dedicated mask token; `<|pad|>` serves as one (it never occurs inside training windows).
Loss is counted on the chosen positions only. Validation masks come from a fresh generator with
the same seed every time, so evaluations are comparable across steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slmkit.train.objectives.lm import IGNORE, Window, collate_windows, mean_token_loss, next_token_loss
from slmkit.train.objectives.protocol import StepLoss


class MaskedLanguageModeling:
    name = "mlm"
    metric = "loss"
    higher_is_better = False

    def __init__(self, mask_id: int, vocab_size: int, seed: int = 0, rate: float = 0.15, eval_batch_size: int = 8) -> None:
        self.mask_id, self.vocab_size, self.rate, self.seed = mask_id, vocab_size, rate, seed
        self.eval_batch_size = eval_batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mask(x, self.generator)

    def _mask(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.rand(x.shape, generator=g) < self.rate
        targets = torch.where(chosen, x, IGNORE)
        roll = torch.rand(x.shape, generator=g)
        random_tokens = torch.randint(self.vocab_size, x.shape, generator=g)
        inputs = torch.where(chosen & (roll < 0.8), self.mask_id, x)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
        return inputs, targets

    def collate(self, windows: Sequence[Window]) -> dict[str, torch.Tensor]:
        return collate_windows(windows)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        output = model(batch["input_ids"], targets=batch["targets"])
        return StepLoss(next_token_loss(output.logits, batch["targets"]), {}, output)  # masked targets: no MTP term

    def evaluate(self, model: nn.Module, windows: Sequence[Window]) -> dict[str, float]:
        """Loss on the masked positions of unmasked validation windows, with fixed masks."""
        g = torch.Generator().manual_seed(self.seed)
        n, batches = self.eval_batch_size, []
        for i in range(0, len(windows), n):
            inputs, targets = self._mask(torch.stack([w[0] for w in windows[i : i + n]]), g)
            batches.append({"input_ids": inputs, "targets": targets})
        return mean_token_loss(model, batches)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
