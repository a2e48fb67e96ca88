"""Direct Preference Optimization (Rafailov et al., 2023).

For a prompt x with a preferred answer y_w and a rejected one y_l, with sequence log-probs
log p(y|x) under the policy and under a frozen reference:

    reward(y) = beta * (log p_policy(y|x) - log p_ref(y|x))
    loss      = -log sigmoid(reward(y_w) - reward(y_l))

The reference is a frozen copy of the starting model, the base model itself with its LoRA
adapters switched off, or log-probs computed once before training (`precompute_reference`),
which frees its memory. Other preference losses (ORPO, KTO, IPO) differ only in `preference_loss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import InputError
from slmkit.chat import ChatFormat
from slmkit.model.lora import adapters_disabled, lora_layers
from slmkit.train.objectives.protocol import StepLoss
from slmkit.train.objectives.sft import (
    IGNORE,
    SFTExample,
    build_example,
    forward,
    pad_batch,
)


@dataclass
class PreferenceExample:
    chosen: SFTExample
    rejected: SFTExample
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)


def preference_messages(record: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(prompt-only record, chosen text, rejected text) from {prompt|instruction[,input]|messages, chosen, rejected}."""
    where = record.get("_source", "record")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        raise InputError(f"{where}: a preference record needs non-empty `chosen` and `rejected` texts")
    if "prompt" in record:
        prompt = {"instruction": record["prompt"], "_source": where}
    elif "instruction" in record or "messages" in record:
        prompt = {k: v for k, v in record.items() if k in ("instruction", "input", "messages", "_source")}
    else:
        raise InputError(f"{where}: a preference record needs `prompt`, `instruction` or `messages`")
    return prompt, chosen, rejected


def _with_answer(prompt_record: dict[str, Any], text: str) -> dict[str, Any]:
    if "messages" in prompt_record:
        return {**prompt_record, "messages": [*prompt_record["messages"], {"role": "assistant", "content": text}]}
    return {**prompt_record, "output": text}


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions that are not IGNORE: [B, T, V], [B, T] -> [B]."""
    logp = logits.float().log_softmax(-1)
    valid = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


def preference_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


class DirectPreference:
    name = "dpo"
    # The preference loss, not reward accuracy: on a small validation set every pair is ranked right
    # within a few steps, and accuracy then ties every later evaluation with the first that got there.
    metric = "loss"
    higher_is_better = False

    def __init__(self, template: ChatFormat, max_len: int, pad_id: int, beta: float = 0.1,
                 reference: nn.Module | None = None, eval_batch_size: int = 8) -> None:
        if beta <= 0:
            raise InputError(f"--beta must be positive, not {beta}")
        self.template, self.max_len, self.pad_id, self.beta = template, max_len, pad_id, beta
        self.reference, self.eval_batch_size = reference, eval_batch_size

    def prepare(self, records: Sequence[dict[str, Any]]) -> list[PreferenceExample]:
        out = []
        for r in records:
            prompt_record, chosen, rejected = preference_messages(r)
            prompt = self.template.encode_record(prompt_record).prompt
            answers = [self.template.encode_record(_with_answer(prompt_record, text)).response for text in (chosen, rejected)]
            out.append(PreferenceExample(*(build_example(prompt, a, self.max_len) for a in answers)))
        return out

    def collate(self, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
        batch = pad_batch([e.chosen for e in examples] + [e.rejected for e in examples], self.pad_id)
        if all(e.ref is not None for e in examples):
            batch["ref_logps"] = torch.tensor([e.ref[0] for e in examples] + [e.ref[1] for e in examples])
        return batch

    def _reference(self, model: nn.Module, fallback_to_model: bool = False):
        """(module, context) that computes reference log-probs."""
        if self.reference is not None:
            return self.reference, contextlib.nullcontext()
        if any(True for _ in lora_layers(model)):
            return model, adapters_disabled(model)
        if fallback_to_model:  # before training, the model is its own reference
            return model, contextlib.nullcontext()
        raise InputError("DPO needs a reference: a frozen model, LoRA adapters to switch off, or precomputed log-probs")

    def _reference_logps(self, model: nn.Module, batch: dict[str, Any], fallback_to_model: bool = False) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        ref, context = self._reference(model, fallback_to_model)
        with torch.no_grad(), context:
            return sequence_logps(forward(ref, batch), batch["targets"])

    def _rewards(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Rewards of the chosen and the rejected answers, and the policy's forward (a `ModelOutput`
        in training, whose MoE/MTP terms the loop adds; None in evaluation)."""
        reference = self._reference_logps(model, batch)
        output = forward(model, batch, targets=batch["targets"]) if model.training else None
        logits = output.logits if output is not None else forward(model, batch)
        rewards = self.beta * (sequence_logps(logits, batch["targets"]) - reference.to(logits.device))
        n = rewards.shape[0] // 2
        return rewards[:n], rewards[n:], output

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepLoss:
        chosen, rejected, output = self._rewards(model, batch)
        return StepLoss(preference_loss(chosen, rejected), _reward_stats(chosen.detach(), rejected.detach()), output,
                        batch["targets"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: Sequence[PreferenceExample]) -> dict[str, float]:
        model.eval()
        device = next(model.parameters()).device
        chosen, rejected = [], []
        for i in range(0, len(examples), self.eval_batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[i : i + self.eval_batch_size]).items()}
            c, r, _ = self._rewards(model, batch)
            chosen.append(c)
            rejected.append(r)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {"loss": preference_loss(c, r).item(), **_reward_stats(c, r)}

    @torch.no_grad()
    def precompute_reference(self, model: nn.Module, examples: Sequence[PreferenceExample]) -> None:
        """Store the reference log-probs in each example, so no reference model is kept."""
        model.eval()
        device = next(model.parameters()).device
        for i in range(0, len(examples), self.eval_batch_size):
            chunk = examples[i : i + self.eval_batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([e.chosen for e in chunk] + [e.rejected for e in chunk], self.pad_id).items()}
            logps = self._reference_logps(model, batch, fallback_to_model=True).tolist()
            for j, e in enumerate(chunk):
                e.ref = (logps[j], logps[j + len(chunk)])
        self.reference = None


def _reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "margin": (chosen - rejected).mean().item(),
    }
