"""Offloaded inference (FlexGen-style) for models larger than the compute device's memory.

The transformer blocks' weights live off the device, in CPU memory (`cpu`) or in the model's
own safetensors file, read through a memory map (`disk`). Only the embeddings, the final norm
and the output head stay on the device. Hooks around each block bring its weights to the device
just before it runs and drop them right after, while a background thread already fetches the
next block (on a side CUDA stream when the device is a GPU), so loading overlaps compute. At most
two blocks are on the device at a time; the outputs are those of the ordinary model, bit for bit.
"""

from __future__ import annotations

import os
import resource
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model.io import WEIGHTS
from slmkit.model.layers import POSITIONS
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer

OffloadMode = Literal["cpu", "disk"]
Weights = dict[str, torch.Tensor]


@dataclass
class OffloadStats:
    mode: str
    device: str
    layer_bytes: int  # weights of all blocks together
    resident_bytes: int  # weights kept on the device for good (embeddings, final norm, head)
    peak_layer_bytes: int  # most block weights on the device at once
    peak_device_bytes: int | None  # CUDA allocator high-water mark (None on CPU)
    peak_rss_bytes: int  # the process's resident-set high-water mark

    def summary(self) -> str:
        mb = 1 / 2**20
        device = f"; device peak {self.peak_device_bytes * mb:.1f} MiB" if self.peak_device_bytes is not None else ""
        return (f"offload {self.mode} -> {self.device}: at most {self.peak_layer_bytes * mb:.1f} MiB of "
                f"{self.layer_bytes * mb:.1f} MiB block weights on the device at once, {self.resident_bytes * mb:.1f} MiB "
                f"resident{device}; process peak RSS {self.peak_rss_bytes * mb:.1f} MiB")


class LayerStreamer:
    """Hooks that stream block weights to the device, one block ahead."""

    def __init__(self, model: Transformer, weights_file: Path, mode: OffloadMode, device: torch.device) -> None:
        self.model, self.file, self.mode, self.device = model, weights_file, mode, device
        self.blocks = list(model.layers)
        with safe_open(str(weights_file), "pt") as f:
            keys = list(f.keys())
        self.keys = [[k for k in keys if k.startswith(f"layers.{i}.")] for i in range(len(self.blocks))]
        self.host: list[Weights] | None = None
        if mode == "cpu":  # read once; pinned memory makes host -> GPU copies asynchronous
            pin = device.type == "cuda"
            self.host = [{k: (t.pin_memory() if pin else t) for k, t in self._read(i).items()} for i in range(len(self.blocks))]
        self.sizes = [sum(self._nbytes(i)) for i in range(len(self.blocks))]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmkit-prefetch")
        self.pending: dict[int, Future] = {}
        self.on_device = 0
        self.peak = 0
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: self._before(i))
            block.register_forward_hook(lambda module, args, output, i=i: self._after(i))

    def _nbytes(self, i: int) -> list[int]:
        if self.host is not None:
            return [t.numel() * t.element_size() for t in self.host[i].values()]
        with safe_open(str(self.file), "pt") as f:
            return [_slice_bytes(f, k) for k in self.keys[i]]

    def _read(self, i: int) -> Weights:
        """Block i's weights from the safetensors file (memory-mapped), keyed as in the block."""
        prefix = f"layers.{i}."
        with safe_open(str(self.file), "pt", device="cpu") as f:
            return {k.removeprefix(prefix): f.get_tensor(k) for k in self.keys[i]}

    def _fetch(self, i: int) -> tuple[Weights, torch.cuda.Event | None]:
        """Runs on the prefetch thread: read block i and start its copy to the device."""
        weights = self.host[i] if self.host is not None else self._read(i)
        if self.stream is None:
            return {k: t.to(self.device) for k, t in weights.items()}, None
        with torch.cuda.stream(self.stream):
            moved = {k: t.to(self.device, non_blocking=True) for k, t in weights.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def _prefetch(self, i: int) -> None:
        if i not in self.pending:
            self.pending[i] = self.executor.submit(self._fetch, i)
            self.on_device += self.sizes[i]
            self.peak = max(self.peak, self.on_device)

    def _before(self, i: int) -> None:
        self._prefetch(i)  # a no-op when it was prefetched
        weights, event = self.pending.pop(i).result()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in weights.values():  # the allocator must not reuse them before compute is done
                t.record_stream(current)
        self.blocks[i].load_state_dict(weights, strict=True, assign=True)
        self._prefetch((i + 1) % len(self.blocks))  # the first block of the next step follows the last

    def _after(self, i: int) -> None:
        self.blocks[i].to("meta")
        self.on_device -= self.sizes[i]

    def stats(self, resident_bytes: int) -> OffloadStats:
        cuda = self.device.type == "cuda"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        return OffloadStats(self.mode, str(self.device), sum(self.sizes), resident_bytes, self.peak,
                            torch.cuda.max_memory_allocated(self.device) if cuda else None, rss)


def _slice_bytes(f, key: str) -> int:
    """Bytes of one tensor in a safetensors file, without reading it."""
    part = f.get_slice(key)
    dtype_bytes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    numel = 1
    for size in part.get_shape():
        numel *= size
    return numel * dtype_bytes.get(part.get_dtype(), 4)


def load_offloaded(
    directory: str | os.PathLike, mode: OffloadMode = "disk", device: str | torch.device | None = None
) -> tuple[Transformer, Tokenizer]:
    """A model directory -> (model whose blocks stream from `mode` storage to `device`, tokenizer).

    `device` defaults to CUDA when available, else CPU. `model.offload.stats(...)` (via
    `offload_stats(model)`) reports how much memory the run needed.
    """
    if mode not in ("cpu", "disk"):
        raise InputError(f"unknown offload mode {mode!r}; choose cpu or disk")
    directory = Path(directory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = ModelConfig.load(directory)
    weights_file = directory / WEIGHTS
    if not weights_file.is_file():
        raise InputError(f"{directory} has no {WEIGHTS}")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.pos = POSITIONS[cfg.pos](cfg)  # its buffers are computed, not stored: build them for real
    with safe_open(str(weights_file), "pt", device="cpu") as f:
        resident = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("layers.")}  # noqa: SIM118
    if cfg.tie_embeddings:  # the file holds the shared tensor under one of its two names
        shared = resident.pop("lm_head.weight", None)
        resident.setdefault("embed_tokens.weight", shared)
    missing = model.load_state_dict(resident, strict=False, assign=True).missing_keys
    if absent := [k for k in missing if not k.startswith("layers.") and not (cfg.tie_embeddings and k == "lm_head.weight")]:
        raise InputError(f"{weights_file} lacks {absent[0]} (corrupt, or for another config)")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for name, child in model.named_children():
        if name != "layers":
            child.to(device)
    model.eval()
    model.offload = LayerStreamer(model, weights_file, mode, device)
    return model, Tokenizer.load(directory)


def offload_stats(model: Transformer) -> OffloadStats:
    """Memory high-water marks of an offloaded model's runs so far."""
    streamer: LayerStreamer = model.offload
    resident = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("layers."))
    return streamer.stats(resident)
