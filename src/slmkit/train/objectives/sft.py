"""Supervised fine-tuning on prompt/response pairs: next-token loss on the response only.

Each example is prompt ids + response ids; the targets of prompt positions are the ignore index
(-100) unless `train_on_prompt`, so the model learns to answer, not to write instructions.
Batches are right-padded (the attention mask keeps padding out of attention, and padded
positions carry no loss), or packed: examples end to end in full-context rows, each with its own
positions and attention confined to itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.errors import InputError
from slmkit.chat import ChatFormat
from slmkit.model.transformer import Transformer
from slmkit.train.objectives.protocol import StepLoss

IGNORE = -100


@dataclass
class SFTExample:
    ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def build_example(prompt: list[int], response: list[int], max_len: int, train_on_prompt: bool = False,
                  prompt_mask: Sequence[bool] = ()) -> SFTExample:
    """Prompt + response, cut to `max_len + 1` tokens (inputs and shifted targets both fit the
    context); the prompt is cut from the left so that the response keeps its start. Prompt tokens
    take loss where `prompt_mask` is True (earlier assistant turns), or all with `train_on_prompt`."""
    if not response:
        raise InputError("a training record has an empty response")
    trained = [train_on_prompt or bool(m) for m in prompt_mask] if prompt_mask else [train_on_prompt] * len(prompt)
    room = max_len + 1 - len(response)
    keep = 1 if room < 1 else room
    prompt, trained, response = prompt[-keep:], trained[-keep:], response[: max_len] if room < 1 else response
    ids = prompt + response
    labels = [t if train else IGNORE for t, train in zip(prompt, trained)] + list(response)
    return SFTExample(ids, labels)


def pad_batch(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs (ids[:-1]), shifted targets (labels[1:]) and the attention mask."""
    width = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[i, :n] = torch.tensor(e.ids[:-1])
        targets[i, :n] = torch.tensor(e.labels[1:])
        mask[i, :n] = 1
    return {"input_ids": inputs, "targets": targets, "attention_mask": mask}


def pack_batch(examples: Sequence[SFTExample], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Examples laid end to end in rows of `width` tokens (first fit, in order), each with its own
    positions from 0, so that attention and positions stop at example boundaries; the rest of a
    row is padding that carries no loss. Fewer rows and far less padding than `pad_batch`."""
    rows: list[list[SFTExample]] = []
    for e in examples:
        row = next((r for r in rows if sum(len(x.ids) - 1 for x in r) + len(e.ids) - 1 <= width), None)
        if row is None:
            rows.append(row := [])
        row.append(e)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.ids) - 1
            inputs[i, start : start + n] = torch.tensor(e.ids[:-1])
            targets[i, start : start + n] = torch.tensor(e.labels[1:])
            positions[i, start : start + n] = torch.arange(n)
            start += n
    return {"input_ids": inputs, "targets": targets, "positions": positions}


def forward(model: Transformer, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    """The model on a padded or packed batch: logits, or with `targets=` the whole `ModelOutput`."""
    if "positions" in batch:
        return model(batch["input_ids"], positions=batch["positions"], **kwargs)
    mask = batch["attention_mask"]
    return model(batch["input_ids"], None if bool(mask.all()) else mask, **kwargs)


class SupervisedFineTuning:
    name = "sft"
    metric = "loss"
    higher_is_better = False

    def __init__(self, template: ChatFormat, max_len: int, pad_id: int, train_on_prompt: bool = False, eval_batch_size: int = 16,
                 pack: bool = False) -> None:
        self.template, self.max_len, self.pad_id = template, max_len, pad_id
        self.train_on_prompt, self.eval_batch_size, self.pack = train_on_prompt, eval_batch_size, pack

    def prepare(self, records: Sequence[dict[str, Any]]) -> list[SFTExample]:
        out = []
        for r in records:
            encoded = self.template.encode_record(r)
            if not encoded.response:
                raise InputError(f"{r.get('_source', 'a record')}: empty response (no output / assistant message)")
            out.append(build_example(encoded.prompt, encoded.response, self.max_len, self.train_on_prompt, encoded.prompt_mask))
        return out

    def collate(self, examples: Sequence[SFTExample]) -> dict[str, torch.Tensor]:
        return pack_batch(examples, self.max_len, self.pad_id) if self.pack else pad_batch(examples, self.pad_id)

    def loss(self, model: Transformer, batch: dict[str, torch.Tensor]) -> StepLoss:
        output = forward(model, batch, targets=batch["targets"])
        loss = F.cross_entropy(output.logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
        return StepLoss(loss, {}, output, batch["targets"])

    @torch.no_grad()
    def evaluate(self, model: Transformer, examples: Sequence[SFTExample]) -> dict[str, float]:
        """Mean loss per response token over all `examples`."""
        model.eval()
        device = model.embed_tokens.weight.device
        total, count = 0.0, 0
        for i in range(0, len(examples), self.eval_batch_size):
            batch = {k: v.to(device) for k, v in self.collate(examples[i : i + self.eval_batch_size]).items()}
            logits = forward(model, batch)
            total += F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((batch["targets"] != IGNORE).sum())
        return {"loss": total / max(1, count)}
