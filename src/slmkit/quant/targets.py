"""Which linear layers a transform replaces, and replacing a module by name.

Every transform that swaps `nn.Linear`s for something else asks `linear_targets`: post-training
quantization (the linears of the blocks), the int8 base of QLoRA and FP8 training (every linear
but the output head), LoRA injection (the same, refined by its target names) and the calibration
hooks of GPTQ (the linears of one block).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

BLOCKS = ("layers.",)  # the transformer blocks: what post-training quantization replaces


def linear_targets(model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ("lm_head",),
                   kinds: tuple[type[nn.Module], ...] = (nn.Linear,)) -> dict[str, nn.Module]:
    """The modules of `kinds` by name, in model order, whose name starts with one of `include`
    (every name when empty) and is not in `exclude`. The walk does not enter a chosen module, nor
    a wrapper with a `base_layer` (a LoRA layer: its base and adapters belong to it) unless the
    wrapper itself is one of `kinds`."""
    chosen: dict[str, nn.Module] = {}
    closed: str | None = None  # a chosen module or wrapper: its submodules follow it in named_modules()
    for name, module in model.named_modules():
        if closed is not None and name.startswith(closed):
            continue
        closed = None
        if isinstance(module, kinds):
            if name not in exclude and (not include or name.startswith(tuple(include))):
                chosen[name] = module
            closed = f"{name}."
        elif hasattr(module, "base_layer"):
            closed = f"{name}."
    return chosen


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
