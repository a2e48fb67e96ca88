"""LoRA: low-rank adapters on frozen linear layers (float, or quantized for QLoRA).

    y = base(x) + (alpha / r) * B(A(dropout(x)))        A: [r, in], B: [out, r], B starts at 0

`inject_lora` wraps the linear layers whose names match (q, k, v, o, gate, up, down or a regex),
freezes every base weight, and leaves only the adapters trainable. One layer can hold several
named adapters; `set_adapter` switches between them (or turns them off) without touching the
base. `merge` folds the active adapter into the base weight and `unmerge` restores the saved
original bit for bit.

An adapter directory holds `adapter_config.json` (PEFT's keys: r, lora_alpha, target_modules,
rank_pattern / alpha_pattern for layers of another rank) and the weights, keys
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. slmkit writes
`adapter.safetensors` under its own module names, which every model has; PEFT writes
`adapter_model.safetensors` under the Hugging Face model's names. `read_adapter` reads both (PEFT's
through the family mapping, `slmkit.convert.peft`), so PEFT adapters load, merge and serve as
slmkit's do; `slmkit.convert.peft` writes PEFT's layout for a model's `convert to-hf` export.

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
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slmkit._io import read_json, write_json
from slmkit.errors import InputError
from slmkit.quant.linear import QUANTIZED_LINEARS
from slmkit.quant.targets import linear_targets, set_module

DEFAULT_TARGETS = ("q", "k", "v", "o")
ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter.safetensors"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's file (pickled: read weights-only)
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json keys that are read here or leave the computation to the lora_A / lora_B
# tensors (initialization, bookkeeping); any other key with a value set is a LoRA variant (DoRA,
# LoRA biases, fully trained modules, ...) that slmkit does not run, so it is refused.
CONFIG_KEYS = frozenset({
    "peft_type", "peft_version", "task_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_lora_weights", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "runtime_config",
})


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


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear: y += scaling * B (A x), with A [r, in] and B [out, r]."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Adapter:
    """An adapter read from disk: its layers by slmkit module name, and its input dropout."""

    layers: dict[str, LoRAWeights]
    dropout: float


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear an adapter may adapt (the output head too), by name; LoRA layers as themselves."""
    return linear_targets(model, exclude=(), kinds=(nn.Linear, *QUANTIZED_LINEARS, LoRALinear))


def linear_features(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear an adapter may adapt, by name."""
    out = {}
    for name, layer in _adaptable(model).items():
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        out[name] = (base.out_features, base.in_features)
    return out


def read_adapter(directory: str | os.PathLike, model: nn.Module) -> Adapter:
    """The adapter in `directory`, in slmkit's layout (`adapter.safetensors`, slmkit module names)
    or PEFT's (`adapter_model.safetensors`, the module names of the model's Hugging Face family),
    under slmkit's module names and checked against `model`'s linears: a wrong adapter is an error
    before anything is changed."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    weights = next((directory / f for f in (ADAPTER_WEIGHTS, *PEFT_WEIGHTS) if (directory / f).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise InputError(f"{directory} is not a LoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, "
                         f"or PEFT's {PEFT_WEIGHTS[0]})")
    config = read_json(config_path)
    _check_config(config, config_path)
    from slmkit.convert.weights import read_tensors

    pairs = _pairs(read_tensors(weights), weights)
    layers = {m: LoRAWeights(a, b, _scaling(config, m, a.shape[0], config_path)) for m, (a, b) in pairs.items()}
    if weights.name != ADAPTER_WEIGHTS:
        from slmkit.convert.peft import from_hf_names

        layers = from_hf_names(layers, model, weights)
    features = linear_features(model)
    for name, w in layers.items():
        if name not in features:
            raise InputError(f"{weights}: the adapter adapts {name}, which is not a linear layer of this model "
                             "(an adapter for another architecture?)")
        out_features, in_features = features[name]
        if w.a.shape[1] != in_features or w.b.shape[0] != out_features:
            raise InputError(f"{weights}: {name} has lora_A {tuple(w.a.shape)} and lora_B {tuple(w.b.shape)}, but the "
                             f"model's layer is {out_features}x{in_features} (an adapter for another base model?)")
    return Adapter(layers, float(config.get("lora_dropout") or 0.0))


def _check_config(config: object, path: Path) -> None:
    """Plain LoRA only: a variant that changes the computation is refused, never half-applied."""
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise InputError(f"{path} has no integer rank 'r'")
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{path}: peft_type {config['peft_type']!r} is not supported; slmkit loads LoRA adapters")
    if config.get("bias", "none") != "none":
        raise InputError(f"{path}: bias={config['bias']!r} (trained biases) is not supported; only bias='none' loads")
    variants = sorted(k for k, v in config.items() if v and k not in CONFIG_KEYS)
    if variants:
        raise InputError(f"{path} sets {variants[0]}={config[variants[0]]!r}, a LoRA variant slmkit does not run "
                         "(it loads plain LoRA: y = W x + scaling * B A x)")


def _pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from `[base_model.model.]<module>.lora_A.weight` / `lora_B.weight` keys."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise InputError(f"{path} holds {key}, which is not a lora_A or lora_B weight; only plain LoRA adapters load "
                             "(no DoRA magnitudes, biases, embedding adapters or fully trained modules)")
        parts.setdefault(match["module"], {})[match["part"]] = t
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"{path} has {module}.lora_{min(ab)}.weight but no {module}.lora_{'B' if 'A' in ab else 'A'}.weight")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                             "which are not [r, in] and [out, r]")
        out[module] = (a, b)
    if not out:
        raise InputError(f"{path} holds no lora_A / lora_B weights")
    return out


def _pattern_value(patterns: dict[str, Any], module: str, path: Path) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that is the module's whole name
    or its last dotted components."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise InputError(f"{path}: pattern {key!r} is not a regular expression: {e}") from None
    return None


def _scaling(config: dict[str, Any], module: str, rank: int, path: Path) -> float:
    """alpha / r for `module` (alpha / sqrt(r) with use_rslora), as PEFT computes it."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, path)
    r = config["r"] if r is None else r
    if r != rank:
        raise InputError(f"{path} gives {module} rank {r}, but its lora_A has {rank} rows")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, path)
    alpha = config.get("lora_alpha", r) if alpha is None else alpha
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def module_patterns(chosen: set[str], universe: set[str]) -> list[str]:
    """The shortest dotted name endings that pick exactly `chosen` out of `universe`, matched as
    PEFT matches target_modules and rank patterns: a whole name, or its last components."""
    out = set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(u in chosen for u in universe if u == suffix or u.endswith(f".{suffix}")):
                out.add(suffix)
                break
    return sorted(out)


def _rank_config(layers: dict[str, LoRAWeights]) -> dict[str, Any]:
    """r and lora_alpha of most layers; rank_pattern / alpha_pattern for the others."""
    values = {m: (w.rank, _number(w.scaling * w.rank)) for m, w in layers.items()}
    common = Counter(values.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"r": common[0], "lora_alpha": common[1]}
    ranks, alphas = {}, {}
    for value in sorted(set(values.values()) - {common}):
        for key in module_patterns({m for m, v in values.items() if v == value}, set(values)):
            if value[0] != common[0]:
                ranks[key] = value[0]
            if value[1] != common[1]:
                alphas[key] = value[1]
    return {**config, **({"rank_pattern": ranks} if ranks else {}), **({"alpha_pattern": alphas} if alphas else {})}


def _number(x: float) -> float | int:
    return round(x) if abs(x - round(x)) < 1e-9 else x


def write_adapter(directory: str | os.PathLike, layers: dict[str, LoRAWeights], universe: set[str], dropout: float,
                  base_model: str | None, weights_file: str = ADAPTER_WEIGHTS, extra: dict[str, Any] | None = None) -> Path:
    """adapter_config.json + the weights file for `layers`, named as `universe` (every adaptable
    linear's name) names them; target_modules picks exactly the adapted ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / ADAPTER_CONFIG, {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        **_rank_config(layers),
        "lora_dropout": dropout,
        "target_modules": module_patterns(set(layers), universe | set(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        **(extra or {}),
    })
    state = {}
    for module, w in layers.items():  # copies: the parts of a split fused adapter share A
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = w.a.detach().cpu().clone(memory_format=torch.contiguous_format)
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = w.b.detach().cpu().clone(memory_format=torch.contiguous_format)
    save_file(state, str(directory / weights_file), metadata={"format": "pt"})
    return directory


def adapter_layers(model: nn.Module, name: str) -> dict[str, LoRAWeights]:
    """Adapter `name` of `model`, by module name."""
    layers = {module: LoRAWeights(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
              for module, layer in lora_layers(model) if name in layer.lora_A}
    if not layers:
        raise InputError(f"the model has no adapter named {name!r}")
    return layers


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", base_model: str | None = None) -> Path:
    """Write `directory/adapter_config.json` and `directory/adapter.safetensors` for adapter `name`."""
    layers = adapter_layers(model, name)
    dropout = next(layer.lora_dropout[name] for _, layer in lora_layers(model) if name in layer.lora_A)
    return write_adapter(directory, layers, set(linear_features(model)), dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                         base_model)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> str:
    """Add the adapter saved in `directory` (slmkit's layout or PEFT's) to `model` under `name`
    (default: the directory's name) and make it active; returns the name. A wrong adapter is an
    error that leaves the model as it was; loading does not change what trains."""
    directory = Path(directory)
    name = name or directory.name
    adapter = read_adapter(directory, model)
    layers = _adaptable(model)
    for module in adapter.layers:
        layer = layers[module]
        if isinstance(layer, LoRALinear) and name in layer.lora_A:
            raise InputError(f"adapter {name!r} already exists on {module}")
    merged = next((layer.merged for _, layer in lora_layers(model) if layer.merged is not None), None)
    if merged is not None:
        raise InputError(f"adapter {merged!r} is merged; unmerge it before loading another")
    with torch.no_grad():
        for module, weights in adapter.layers.items():
            layer = layers[module]
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer)
                set_module(model, module, layer)
            layer.add_adapter(name, weights.rank, weights.scaling * weights.rank, adapter.dropout)
            for part, value in ((layer.lora_A[name], weights.a), (layer.lora_B[name], weights.b)):
                part.weight.copy_(value)
                part.weight.requires_grad = False
    set_adapter(model, name)
    return name


def find_adapter(model_dir: str | os.PathLike, adapter: str | os.PathLike) -> Path:
    """`model_dir/adapters/<adapter>` when the model has an adapter of that name, else the
    adapter directory `adapter` (slmkit's layout or PEFT's)."""
    named = Path(model_dir) / "adapters" / adapter
    if (named / ADAPTER_CONFIG).is_file():
        return named
    if Path(adapter).is_dir():
        return Path(adapter)
    raise InputError(f"{model_dir} has no adapter {str(adapter)!r} and {adapter} is not a directory; "
                     f"adapters: {', '.join(available_adapters(model_dir)) or 'none'}")


def import_adapter(model_dir: str | os.PathLike, source: str | os.PathLike, name: str | None = None, *,
                   force: bool = False) -> Path:
    """Write the adapter in `source` (slmkit's layout or PEFT's) to `model_dir/adapters/NAME` in
    slmkit's layout, after checking it against the model; returns that directory."""
    from slmkit._io import atomic_dir
    from slmkit.model.io import read_config
    from slmkit.model.transformer import Transformer

    source = Path(source)
    name = name or source.name
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise InputError(f"adapter name {name!r} is not a plain directory name (letters, digits, '.', '_', '-')")
    cfg, _ = read_config(model_dir)
    with torch.device("meta"):  # names and shapes only
        model = Transformer(cfg)
    adapter = read_adapter(source, model)
    base_model = read_json(source / ADAPTER_CONFIG).get("base_model_name_or_path")
    out = Path(model_dir) / "adapters" / name
    with atomic_dir(out, force=force) as tmp:
        write_adapter(tmp, adapter.layers, set(linear_features(model)), adapter.dropout, base_model)
    return out


def available_adapters(model_dir: str | os.PathLike) -> list[str]:
    root = Path(model_dir) / "adapters"
    return sorted(d.name for d in root.iterdir() if (d / ADAPTER_CONFIG).is_file()) if root.is_dir() else []


def adapter_size_bytes(directory: str | os.PathLike) -> int:
    files = [Path(directory) / f for f in (ADAPTER_WEIGHTS, *PEFT_WEIGHTS)]
    return next(f for f in files if f.is_file()).stat().st_size


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
