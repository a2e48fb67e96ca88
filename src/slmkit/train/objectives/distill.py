"""Knowledge distillation (Hinton et al., 2015): the student matches the teacher's
temperature-softened next-token distribution as well as the data.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross_entropy(student, next tokens)

T^2 keeps the soft term's gradient on the scale of the hard one as T grows. The teacher runs
without gradients, optionally in bf16, and must share the student's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import InputError
from slmkit.train.objectives.protocol import StepLoss


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft KL term, hard CE term) over [B, T, V] logits."""
    s, t = student.float().flatten(0, 1), teacher.float().flatten(0, 1)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, targets.flatten())
    return alpha * kl + (1 - alpha) * ce, kl, ce


class Distillation:
    name = "distill"
    metric = "loss"
    higher_is_better = False

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 teacher_dtype: torch.dtype | None = None, eval_batch_size: int = 8) -> None:
        if temperature <= 0:
            raise InputError(f"--temperature must be positive, not {temperature}")
        if not 0 <= alpha <= 1:
            raise InputError(f"--alpha must be in [0, 1], not {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        if teacher_dtype is not None:
            self.teacher.to(teacher_dtype)
        self.temperature, self.alpha, self.eval_batch_size = temperature, alpha, eval_batch_size

    def prepare(self, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        return windows

    def collate(self, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack([w[0] for w in windows]), "targets": torch.stack([w[1] for w in windows])}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
        with torch.no_grad():
            teacher = self.teacher(batch["input_ids"])
        output = model(batch["input_ids"], targets=batch["targets"])
        total, kl, ce = distillation_loss(output.logits, teacher, batch["targets"], self.temperature, self.alpha)
        return StepLoss(total, {"kl": kl.item(), "ce": ce.item()}, output, batch["targets"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, windows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """The student's own next-token loss (what perplexity measures)."""
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(windows), self.eval_batch_size):
            batch = self.collate([windows[j] for j in range(i, min(len(windows), i + self.eval_batch_size))])
            logits = model(batch["input_ids"].to(device)).float()
            targets = batch["targets"].to(device)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        loss = total / max(1, count)
        return {"loss": loss, "ppl": math.exp(loss)}
