"""Mixed precision: which dtype the forward pass computes in, and whether gradients need scaling.

Weights and optimizer state stay fp32; autocast runs matmuls in bf16 or fp16. fp16 has a narrow
exponent range, so its loss is scaled (GradScaler) to keep small gradients from flushing to zero;
bf16 has fp32's range and needs no scaler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from slmkit.errors import InputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto` -> fp32 on CPU (bf16 when asked: fast on CPUs with AVX-512 BF16), bf16 on GPUs that
    support it, fp16 on older GPUs."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise InputError("fp16 compute is unusably slow on CPU; use --precision bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU does not support bf16; use --precision fp16 or fp32")
    return Precision(name, device)
