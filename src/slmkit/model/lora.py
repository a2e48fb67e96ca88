"""LoRA: low-rank adapters on frozen linear layers (float, or quantized for QLoRA).

    y = base(x) + (alpha / r) * B(A(dropout(x)))        A: [r, in], B: [out, r], B starts at 0

`inject_lora` wraps the linear layers whose names match (q, k, v, o, gate, up, down or a regex),
freezes every base weight, and leaves only the adapters trainable. One layer can hold several
named adapters; `set_adapter` switches between them (or turns them off) without touching the
base. `merge` folds the active adapter into the base weight and `unmerge` restores the saved
original bit for bit. Adapters are saved in the PEFT layout (`adapter_config.json` +
`adapter.safetensors` with keys `base_model.model.<module>.lora_A.weight`).

QLoRA's frozen base is `slmkit.quant.methods.quantize_int8` (weight-only int8, a scale per output
channel); `LoRALinear` wraps any of the quantized layers of `slmkit.quant.linear` like a float one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slmkit._io import write_json
from slmkit.errors import InputError
from slmkit.quant.linear import QUANTIZED_LINEARS
from slmkit.quant.targets import linear_targets, set_module

DEFAULT_TARGETS = ("q", "k", "v", "o")
ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A base linear layer (float or quantized, frozen) plus named low-rank adapters."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self._original: torch.Tensor | None = None

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float) -> None:
        base = self.base_layer
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else None  # quantized bases: the default float
        self.lora_A[name] = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B[name].weight)  # the adapter starts as the identity change
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling[name] = alpha / rank
        self.active = name

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update: scaling * B @ A, [out, in]."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        name = self.active
        if name is None or name == self.merged:
            return y
        a = self.lora_A[name]
        update = self.lora_B[name](a(self.lora_dropout[name](x).to(a.weight.dtype))) * self.scaling[name]
        return y + update.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged is not None:
            raise InputError(f"adapter {self.merged!r} is already merged; unmerge it first")
        if self.active is None:
            raise InputError("no active adapter to merge")
        if not isinstance(self.base_layer, nn.Linear):
            raise InputError("cannot merge into an int8 base; merge the adapter into the float model it was trained for")
        weight = self.base_layer.weight
        self._original = weight.detach().clone()
        weight += self.delta(self.active).to(weight.dtype)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.base_layer.weight.copy_(self._original)
        self._original, self.merged = None, None


def _matches(name: str, targets: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for target in targets:
        if leaf == ALIASES.get(target, target) or re.fullmatch(target, name):
            return True
    return False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def inject_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    name: str = "default",
) -> list[str]:
    """Add adapter `name` to the matching linear layers (wrapping them once), freeze everything
    else in `model`, and return the wrapped module names."""
    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, not {rank}")
    chosen = []
    for owner, layer in linear_targets(model, kinds=(nn.Linear, *QUANTIZED_LINEARS, LoRALinear)).items():
        if not _matches(owner, targets):
            continue
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            set_module(model, owner, layer)
        if name in layer.lora_A:
            raise InputError(f"adapter {name!r} already exists on {owner}")
        layer.add_adapter(name, rank, alpha, dropout)
        chosen.append(owner)
    if not chosen:
        raise InputError(f"no linear layer matches the LoRA targets {list(targets)}; "
                         f"use names such as {', '.join(ALIASES)} or a regex over module names")
    for param_name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in param_name or ".lora_B." in param_name
    set_adapter(model, name)
    for _, layer in lora_layers(model):  # only the chosen adapter trains
        for adapter in layer.lora_A:
            trainable = adapter == name
            layer.lora_A[adapter].weight.requires_grad = trainable
            layer.lora_B[adapter].weight.requires_grad = trainable
    return chosen


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` active in every LoRA layer that has it (None: base model only)."""
    layers = list(lora_layers(model))
    if name is not None and not any(name in layer.lora_A for _, layer in layers):
        known = sorted({a for _, layer in layers for a in layer.lora_A})
        raise InputError(f"no adapter named {name!r}; adapters: {', '.join(known) or 'none'}")
    for _, layer in layers:
        if layer.merged is not None and layer.merged != name:
            raise InputError(f"adapter {layer.merged!r} is merged; unmerge before switching adapters")
        layer.active = name if name in layer.lora_A else None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The frozen base model for the duration of the block (DPO's reference model with LoRA)."""
    previous = [(layer, layer.active) for _, layer in lora_layers(model)]
    for layer, _ in previous:
        if layer.merged is not None:
            raise InputError("cannot disable a merged adapter; unmerge it first")
        layer.active = None
    try:
        yield
    finally:
        for layer, active in previous:
            layer.active = active


def merge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        if layer.active is not None:
            layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its base layer (with any merged adapter folded in)."""
    for name, layer in list(lora_layers(model)):
        set_module(model, name, layer.base_layer)
    for p in model.parameters():
        p.requires_grad = True
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once and quantized weights too."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QUANTIZED_LINEARS))
    return sum(p.numel() for p in params if p.requires_grad), total


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s weights under PEFT's key names."""
    state = {}
    for module_name, layer in lora_layers(model):
        if name in layer.lora_A:
            state[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().contiguous().cpu()
            state[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().contiguous().cpu()
    if not state:
        raise InputError(f"the model has no adapter named {name!r}")
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", base_model: str | None = None) -> Path:
    """Write `directory/adapter_config.json` and `directory/adapter.safetensors` for adapter `name`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    state = adapter_state(model, name)
    first = layers[0][1]
    rank = first.lora_A[name].out_features
    dropout = first.lora_dropout[name]
    write_json(directory / ADAPTER_CONFIG, {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": first.scaling[name] * rank,
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
    })
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Add the adapter saved in `directory` to `model` under `name` (default: the directory's
    name) and make it active; returns the name."""
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{directory} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    name = name or directory.name
    state = load_file(str(weights_path))
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state})
    targets = [re.escape(m) for m in modules]
    with torch.no_grad():
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        inject_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets, name)
        for module_name, layer in lora_layers(model):
            if name not in layer.lora_A:
                continue
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{module_name}.{part}.weight"
                if key not in state:
                    raise InputError(f"{weights_path} has no {key}; it was saved for another model")
                target = getattr(layer, part)[name].weight
                if state[key].shape != target.shape:
                    raise InputError(f"{weights_path}: {key} has shape {tuple(state[key].shape)}, the model needs {tuple(target.shape)}")
                target.copy_(state[key])
        for n, p in model.named_parameters():  # loading does not change what trains
            p.requires_grad = requires.get(n, False)
    return name


def available_adapters(model_dir: str | os.PathLike) -> list[str]:
    root = Path(model_dir) / "adapters"
    return sorted(d.name for d in root.iterdir() if (d / ADAPTER_CONFIG).is_file()) if root.is_dir() else []


def adapter_size_bytes(directory: str | os.PathLike) -> int:
    return (Path(directory) / ADAPTER_WEIGHTS).stat().st_size


def merge_adapter_dir(model_dir: str | os.PathLike, out: str | os.PathLike, name: str = "default", force: bool = False) -> Path:
    """Write `out`: the model directory `model_dir` with its adapter `name` merged into the
    weights (a plain model directory; a classifier directory stays a classifier)."""
    import shutil

    from slmkit._io import atomic_dir
    from slmkit.model.io import WEIGHTS, load_model, save_model_dir

    model_dir = Path(model_dir)
    adapter_dir = model_dir / "adapters" / name
    if not adapter_dir.is_dir():
        raise InputError(f"{model_dir} has no adapter {name!r}; adapters: {', '.join(available_adapters(model_dir)) or 'none'}")
    model = load_model(model_dir)
    load_adapter(model, adapter_dir, name)
    merge(model)
    unwrap(model)
    with atomic_dir(out, force=force) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != WEIGHTS:
                shutil.copy2(f, tmp / f.name)
        save_model_dir(model, tmp)
        labels = tmp / "labels.json"
        if labels.is_file():  # the merged classifier needs no adapter any more
            meta = json.loads(labels.read_text(encoding="utf-8"))
            write_json(labels, {**meta, "adapter": None})
    return Path(out)
