"""Sequence classification: cross-entropy over labels (optionally class-weighted), with accuracy,
macro-F1, per-class precision/recall and the confusion matrix as validation metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.model.classifier import SequenceClassifier, encode_texts
from slmkit.tokenizer import Tokenizer
from slmkit.train.objectives.protocol import StepLoss


@dataclass
class ClassificationExample:
    text: str
    label: int


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix
    (rows: true label, columns: predicted)."""
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    per_class, f1s = {}, []
    for c, name in enumerate(labels):
        tp = matrix[c][c]
        predicted = sum(matrix[r][c] for r in range(n))
        actual = sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    total = sum(map(sum, matrix))
    return {
        "accuracy": sum(matrix[c][c] for c in range(n)) / total if total else 0.0,
        "macro_f1": sum(f1s) / n,
        "per_class": per_class,
        "confusion": matrix,
    }


class Classification:
    name = "classify"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, labels: Sequence[str], max_len: int,
                 class_weights: Sequence[float] | None = None, eval_batch_size: int = 32) -> None:
        self.tokenizer, self.labels, self.max_len = tokenizer, list(labels), max_len
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.eval_batch_size = eval_batch_size

    def prepare(self, records: Sequence[ClassificationExample]) -> list[ClassificationExample]:
        return list(records)

    def collate(self, examples: Sequence[ClassificationExample]) -> dict[str, torch.Tensor]:
        ids, mask = encode_texts(self.tokenizer, [e.text for e in examples], self.max_len)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e.label for e in examples])}

    def loss(self, model: SequenceClassifier, batch: dict[str, torch.Tensor]) -> StepLoss:
        logits, output = model(batch["input_ids"], batch["attention_mask"], return_output=True)
        logits = logits.float()
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        loss = F.cross_entropy(logits, batch["labels"], weight=weight)
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
        return StepLoss(loss, {"accuracy": accuracy}, output)  # no next tokens: no MTP term

    @torch.no_grad()
    def predict(self, model: SequenceClassifier, examples: Sequence[ClassificationExample]) -> list[int]:
        model.eval()
        device = model.score.weight.device
        out: list[int] = []
        for i in range(0, len(examples), self.eval_batch_size):
            batch = self.collate(examples[i : i + self.eval_batch_size])
            out += model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).argmax(-1).tolist()
        return out

    def evaluate(self, model: SequenceClassifier, examples: Sequence[ClassificationExample]) -> dict[str, float]:
        m = classification_metrics([e.label for e in examples], self.predict(model, examples), self.labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def balanced_class_weights(labels: Sequence[int], n_classes: int) -> list[float]:
    """n / (k * count_c): each class contributes equally to the loss (scikit-learn's `balanced`)."""
    counts = [max(1, sum(1 for y in labels if y == c)) for c in range(n_classes)]
    return [len(labels) / (n_classes * c) for c in counts]
