"""Optional speed and memory options: torch.compile (with eager fallback) and activation checkpointing."""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slmkit.model.transformer import Transformer


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations during backward instead of storing them: memory for
    ~30% more compute. Patches `forward` on the instances, so parameter names (and therefore
    checkpoints) are unchanged."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_or_eager(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """`torch.compile(model)`, tried on one forward+backward; on any failure warn and return the
    eager model, because a missing compiler toolchain should slow a run down, not stop it."""
    compiled = torch.compile(model)
    try:
        with torch.random.fork_rng(devices=[]):
            compiled(example).float().sum().backward()
    except Exception as e:  # inductor failures come as many exception types
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); continuing eager")
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled
