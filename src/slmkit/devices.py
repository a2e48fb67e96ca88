"""Where a model runs and in which dtype: every command's --device and --dtype resolve here.

`auto` device: CUDA, then MPS (Apple GPUs), then CPU. `auto` dtype: float32 on CPU and MPS,
bfloat16 on CUDA GPUs that support it, float16 on older ones.
"""

from __future__ import annotations

import torch

from slmkit.errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the names --precision uses


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A device name (auto, cpu, cuda, cuda:N, mps) -> a torch.device that exists on this machine."""
    name = str(device if device is not None else "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"there is no {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS is not available on this machine; use --device cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name (auto, float32, bfloat16, float16, or fp32/bf16/fp16) -> the torch.dtype to run in on `device`."""
    if isinstance(dtype, torch.dtype):
        name = next((n for n, d in DTYPES.items() if d == dtype), str(dtype))
    else:
        name = str(dtype if dtype is not None else "auto").strip().lower()
        name = ALIASES.get(name, name)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return DTYPES[name]


def resolve(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto"
            ) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) from their names, the device first: `auto` dtype depends on it."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)
