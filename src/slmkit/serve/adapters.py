"""Multi-LoRA serving: many LoRA adapters on one base model, chosen per row of a batch.

Adapters are directories as `slmkit.model.lora.read_adapter` reads them (`MODEL_DIR/adapters/NAME/`
as `slmkit finetune --lora-rank` writes them, or a PEFT adapter of the model's Hugging Face
export). An adapted linear computes y = W x + s * B (A x), s = lora_alpha / r. Serving keeps W once
and adds, per row i of the batch, the delta of that row's adapter: y_i += s_i * (x_i A_i^T) B_i^T.
Adapters are stacked (ranks zero-padded to the largest, which adds exactly zero), and row index 0
is the base model (all-zero A and B), so one batch may mix adapters and the base.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from slmkit.errors import InputError
from slmkit.model.lora import read_adapter
from slmkit.model.transformer import Transformer


class MultiLoRALinear(nn.Module):
    """A base linear plus the stacked adapters of one module; `rows` [B] picks each row's adapter."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor, owner: MultiLoRA) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a", a)  # [n_adapters + 1, r, in]
        self.register_buffer("b", b)  # [n_adapters + 1, out, r]
        self.register_buffer("scaling", scaling)  # [n_adapters + 1]
        self.owner = [owner]  # a list, so that the owner is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.owner[0].rows
        if rows is None or not bool(rows.any()):
            return y
        a, b = self.a[rows].to(x.dtype), self.b[rows].to(x.dtype)  # [B, r, in], [B, out, r]
        delta = (x @ a.transpose(1, 2)) @ b.transpose(1, 2)  # [B, T, out]
        return y + delta * self.scaling[rows].to(x.dtype)[:, None, None]


class MultiLoRA:
    """Attach adapters {name: directory} to `model` in place; `selected(names)` sets the adapter of
    each batch row (None = the base model) for one forward pass."""

    def __init__(self, model: Transformer, adapters: dict[str, str | os.PathLike]) -> None:
        self.names = [None, *adapters]
        self.rows: torch.Tensor | None = None
        self.device = model.embed_tokens.weight.device
        loaded = [read_adapter(path, model).layers for path in adapters.values()]  # every adapter checked first
        modules = dict(model.named_modules())
        targets = sorted({name for layers in loaded for name in layers})
        for name in targets:
            if not isinstance(modules.get(name), nn.Linear):
                raise InputError(f"adapter targets {name!r}, which is not a float linear layer of this model")
        for name in targets:
            base = modules[name]
            rank = max(layers[name].rank for layers in loaded if name in layers)
            a = torch.zeros(len(self.names), rank, base.in_features)
            b = torch.zeros(len(self.names), base.out_features, rank)
            scaling = torch.zeros(len(self.names))
            for i, layers in enumerate(loaded, start=1):
                if name in layers:
                    w = layers[name]
                    a[i, : w.rank], b[i, :, : w.rank], scaling[i] = w.a, w.b, w.scaling
            parent_name, _, attr = name.rpartition(".")
            wrapped = MultiLoRALinear(base, a.to(self.device), b.to(self.device), scaling.to(self.device), self)
            setattr(modules[parent_name], attr, wrapped)

    def index(self, name: str | None) -> int:
        if name not in self.names:
            raise InputError(f"unknown adapter {name!r}; loaded: {', '.join(n for n in self.names if n) or 'none'}")
        return self.names.index(name)

    @contextlib.contextmanager
    def selected(self, names: list[str | None]) -> Iterator[None]:
        """Rows use these adapters inside the block and the base model after it, so that what
        runs between passes (drafters sharing the modules, embedding passes) sees the base."""
        self.rows = torch.tensor([self.index(n) for n in names], dtype=torch.long, device=self.device)
        try:
            yield
        finally:
            self.rows = None
