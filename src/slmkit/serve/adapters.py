"""Multi-LoRA serving: many LoRA adapters on one base model, chosen per row of a batch.

Adapter directory (`MODEL_DIR/adapters/NAME/`):

    adapter_config.json   {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    adapter.safetensors   for each adapted linear, by its module name in the model (PEFT's
                          "base_model.model." prefix, as `slmkit finetune --lora-rank` writes, or none):
                          "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"  [r, in_features]
                          "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"  [out_features, r]

An adapted linear computes y = W x + (alpha / r) * B (A x). Serving keeps W once and adds, per
row i of the batch, the delta of that row's adapter: y_i += s_i * (x_i A_i^T) B_i^T. Adapters are
stacked (ranks zero-padded to the largest, which adds exactly zero), and row index 0 is the base
model (all-zero A and B), so one batch may mix adapters and the base.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slmkit.errors import InputError
from slmkit.model.lora import PEFT_PREFIX
from slmkit.model.transformer import Transformer

CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"


def read_adapter(path: str | os.PathLike) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter directory -> (scaling alpha/r, {module name: (A [r, in], B [out, r])})."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise InputError(f"{path} is not a LoRA adapter directory (needs {CONFIG} and {WEIGHTS})")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if "r" not in config:
        raise InputError(f"{path / CONFIG} has no rank 'r'")
    scaling = float(config.get("lora_alpha", config["r"])) / config["r"]
    tensors = load_file(str(path / WEIGHTS))
    pairs = {}
    tensors = {key.removeprefix(PEFT_PREFIX): t for key, t in tensors.items()}  # as `save_adapter` writes them
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            b_key = f"{name}.lora_B.weight"
            if b_key not in tensors:
                raise InputError(f"{path / WEIGHTS} has {key} but no {b_key}")
            pairs[name] = (tensors[key], tensors[b_key])
    if not pairs:
        raise InputError(f"{path / WEIGHTS} holds no '*.lora_A.weight' / '*.lora_B.weight' pairs")
    return scaling, pairs


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
        loaded = [read_adapter(path) for path in adapters.values()]
        modules = dict(model.named_modules())
        targets = sorted({name for _, pairs in loaded for name in pairs})
        for name in targets:
            base = modules.get(name)
            if not isinstance(base, nn.Linear):
                raise InputError(f"adapter targets {name!r}, which is not a linear layer of this model")
            rank = max(pairs[name][0].shape[0] for _, pairs in loaded if name in pairs)
            a = torch.zeros(len(self.names), rank, base.in_features)
            b = torch.zeros(len(self.names), base.out_features, rank)
            scaling = torch.zeros(len(self.names))
            for i, (s, pairs) in enumerate(loaded, start=1):
                if name in pairs:
                    lora_a, lora_b = pairs[name]
                    if lora_a.shape[1] != base.in_features or lora_b.shape[0] != base.out_features:
                        raise InputError(f"adapter {self.names[i]!r}: {name} has shapes {tuple(lora_a.shape)}, "
                                         f"{tuple(lora_b.shape)}; the model's layer is {base.out_features}x{base.in_features}")
                    a[i, : lora_a.shape[0]], b[i, :, : lora_b.shape[1]], scaling[i] = lora_a, lora_b, s
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
