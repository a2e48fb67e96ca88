"""A sequence classifier: the Transformer's final hidden states, pooled, into a linear head.

Pooling `last` reads the last real token (for a causal model the only one that has seen the
whole text; an end-of-text token is appended so it is the same token every time), `mean`
averages the real tokens, `first` reads the first. A classifier directory is a model directory
(the backbone) plus `classifier.safetensors` (the head) and `labels.json` (label names, pooling,
and the adapter to apply, if any).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit._io import write_json
from slmkit.errors import InputError
from slmkit.model.io import load_model, save_model_dir
from slmkit.model.moe import moe_aux_loss
from slmkit.model.transformer import ModelOutput, Transformer
from slmkit.tokenizer import Tokenizer

POOLINGS = ("last", "mean", "first")
HEAD_WEIGHTS, LABELS = "classifier.safetensors", "labels.json"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, d] hidden states and a right-padded [B, T] 0/1 mask -> [B, d]."""
    if how == "last":
        last = mask.long().sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if how == "first":
        return hidden[:, 0]
    raise InputError(f"unknown pooling {how!r}; choose one of {', '.join(POOLINGS)}")


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: Transformer, labels: Sequence[str], pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        if len(labels) < 2:
            raise InputError(f"a classifier needs at least 2 labels, got {list(labels)}")
        self.backbone, self.labels, self.pooling = backbone, list(labels), pooling
        self.score = nn.Linear(backbone.cfg.d_model, len(labels))
        nn.init.normal_(self.score.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_output: bool = False) -> torch.Tensor | tuple[torch.Tensor, ModelOutput]:
        """[B, T] ids (right-padded) -> [B, n_labels] logits; with `return_output`, also the
        backbone's `ModelOutput` (its MoE balance loss and expert load, for training)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        full = bool(attention_mask.all())  # an unpadded batch takes the fast causal path
        output = self.backbone.forward_hidden(input_ids, None if full else attention_mask)
        logits = self.score(pool(output.hidden, attention_mask, self.pooling))
        if not return_output:
            return logits
        output.aux_loss = moe_aux_loss(output.router, self.backbone.cfg.aux_loss_coef)
        return logits, output

    def freeze(self, train: str) -> None:
        """Which layers train: `head`, `last-N` (the last N blocks, final norm and head) or `all`."""
        if train == "all":
            for p in self.parameters():
                p.requires_grad = True
            return
        for p in self.backbone.parameters():
            p.requires_grad = False
        if train.startswith("last-"):
            n = train.removeprefix("last-")
            if not n.isdigit() or not 0 < int(n) <= len(self.backbone.layers):
                raise InputError(f"--train last-N needs 1 <= N <= {len(self.backbone.layers)}, not {train!r}")
            for block in self.backbone.layers[-int(n):]:
                for p in block.parameters():
                    p.requires_grad = True
            for p in self.backbone.norm.parameters():
                p.requires_grad = True
        elif train != "head":
            raise InputError(f"--train must be head, last-N or all, not {train!r}")
        for p in self.score.parameters():
            p.requires_grad = True


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> right-padded ids and mask, each text truncated to `max_len` tokens including the
    end-of-text token appended to it."""
    eot = [tokenizer.eot_id] if tokenizer.eot_token else []
    rows = [tokenizer.encode_ordinary(t)[: max_len - len(eot)] + eot for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def save_classifier(model: SequenceClassifier, directory: str | os.PathLike, tokenizer: Tokenizer,
                    adapter: str | None = None, backbone_dir: str | os.PathLike | None = None) -> Path:
    """Write the classifier directory; with `backbone_dir` (LoRA runs) the frozen backbone's files
    are linked rather than rewritten, and `adapter` names the adapter under adapters/."""
    directory = Path(directory)
    if backbone_dir is None:
        save_model_dir(model.backbone, directory, tokenizer)
    else:
        _copy_model_files(Path(backbone_dir), directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.score.state_dict().items()}, str(directory / HEAD_WEIGHTS))
    write_json(directory / LABELS, {"labels": model.labels, "pooling": model.pooling, "adapter": adapter})
    return directory


def _copy_model_files(source: Path, target: Path) -> None:
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.name not in (HEAD_WEIGHTS, LABELS):
            shutil.copy2(f, target / f.name)


class Classifier:
    """A loaded classifier: `predict(text)` -> label, `predict_proba(text)` -> {label: p}."""

    def __init__(self, model: SequenceClassifier, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer

    @property
    def labels(self) -> list[str]:
        return self.model.labels

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        max_len = self.model.backbone.cfg.context_length
        device = self.model.score.weight.device
        for i in range(0, len(texts), batch_size):
            ids, mask = encode_texts(self.tokenizer, texts[i : i + batch_size], max_len)
            out.append(self.model(ids.to(device), mask.to(device)).float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, text: str | Sequence[str]) -> str | list[str]:
        texts = [text] if isinstance(text, str) else list(text)
        labels = [self.labels[i] for i in self.probabilities(texts).argmax(-1).tolist()]
        return labels[0] if isinstance(text, str) else labels

    def predict_proba(self, text: str) -> dict[str, float]:
        return dict(zip(self.labels, self.probabilities([text])[0].tolist()))


def load_classifier(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None) -> Classifier:
    """A classifier directory (from `slmkit finetune classify`) -> `Classifier` on `device`, in
    `dtype` (as for `slmkit.load`)."""
    directory = Path(directory)
    if not (directory / LABELS).is_file() or not (directory / HEAD_WEIGHTS).is_file():
        raise InputError(f"{directory} is not a classifier directory (needs {LABELS} and {HEAD_WEIGHTS}); "
                         "train one with `slmkit finetune classify`")
    meta = json.loads((directory / LABELS).read_text(encoding="utf-8"))
    backbone = load_model(directory, device, dtype)
    if meta.get("adapter"):
        from slmkit.model.lora import load_adapter

        load_adapter(backbone, directory / "adapters" / meta["adapter"])
    model = SequenceClassifier(backbone, meta["labels"], meta.get("pooling", "last"))
    model.score.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    embeddings = backbone.embed_tokens.weight  # the head follows the backbone's device and dtype
    model.score.to(embeddings.device, embeddings.dtype)
    return Classifier(model, Tokenizer.load(directory))
