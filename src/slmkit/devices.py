"""Where a model runs and in which dtype: every command's --device and --dtype resolve here.

`auto` device: CUDA, then MPS (Apple GPUs), then CPU. `auto` dtype: float32 on CPU and MPS,
bfloat16 on CUDA GPUs that support it, float16 on older ones. `available_memory` says how much
room a device has left, for whatever sizes itself to the machine (the serving KV cache).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def available_memory(device: torch.device) -> int | None:
    """Bytes new tensors on `device` can take now, or None when the system does not say. CUDA:
    free device memory plus what torch's caching allocator holds unused. CPU and MPS (whose memory
    is the system's): the RAM the kernel counts as available, within a container's cgroup limit."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    ram = _available_ram()
    headroom = _cgroup_headroom()
    return ram if headroom is None else headroom if ram is None else min(ram, headroom)


def _available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else psutil's figure, else free pages (sysconf)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


CGROUP = Path("/sys/fs/cgroup")
# (limit, usage, the memory.stat key of reclaimable page cache) for cgroup v2, then v1
CGROUP_FILES = (("memory.max", "memory.current", "inactive_file"),
                ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_headroom() -> int | None:
    """What the container's memory limit leaves: limit - (usage - inactive page cache), the working
    set that container runtimes count; None without a limit."""
    for limit_file, usage_file, inactive_key in CGROUP_FILES:
        try:
            limit = (CGROUP / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                continue
            usage = int((CGROUP / usage_file).read_text())
            stat = (CGROUP / limit_file).with_name("memory.stat").read_text().split()
        except (OSError, ValueError):
            continue
        inactive = dict(zip(stat[::2], stat[1::2])).get(inactive_key, "0")
        return max(0, int(limit) - usage + int(inactive))
    return None
