"""Throughput accounting (FLOPs per token, MFU) and the `metrics.jsonl` log."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slmkit.model.transformer import Transformer
from slmkit.train.trackers import Tracker


def flops_per_token(model: Transformer, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter (forward 2 + backward 4), plus
    attention's score and value matmuls (PaLM appendix B: 12 * layers * heads * head_dim * T) over
    windows of T = `seq_len` tokens (default: the model's context).

    A tied output head is a matmul that the non-embedding count leaves out; it is added back.
    """
    cfg = model.cfg
    params = model.num_parameters(embedding=False)
    if cfg.tie_embeddings:
        params += cfg.d_model * cfg.vocab_size
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (seq_len or cfg.context_length)
    return 6 * params + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square matmul in `dtype`: the yardstick for MFU when no --peak-flops is given."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up kernels and caches
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped so the
    log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, trackers: Sequence[Tracker] = ()) -> None:
        self.path, self.trackers = path, trackers
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
