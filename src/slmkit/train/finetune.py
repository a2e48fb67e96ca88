"""The fine-tuning loop: batches of records instead of token shards, validation metrics, early
stopping, and optional LoRA/QLoRA — one loop for every specialization objective.

An objective is a small object with:

    name, metric, higher_is_better     what early stopping watches on validation
    prepare(records) -> examples        tokenize once, before training
    collate(examples) -> batch          tensors for one micro-batch
    loss(model, batch) -> (loss, logs)  the training loss and per-batch numbers to log
    evaluate(model, examples) -> dict   validation metrics (includes `metric`)

It shares the optimizer, LR schedule, precision and metrics log with pretraining; what differs
(classification heads, frozen reference or teacher models) lives in the objective.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit.errors import InputError
from slmkit.model.lora import inject_lora, trainable_parameters
from slmkit.quant.methods import quantize_int8
from slmkit.train.metrics import MetricsLog
from slmkit.train.optim import build_optimizer
from slmkit.train.precision import resolve_precision
from slmkit.train.schedule import lr_at


class Objective(Protocol):
    name: str
    metric: str
    higher_is_better: bool

    def prepare(self, records: Sequence[Any]) -> list[Any]: ...
    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def evaluate(self, model: nn.Module, examples: Sequence[Any]) -> dict[str, float]: ...


@dataclass
class FinetuneConfig:
    """The training flags shared by every `slmkit finetune` command."""

    max_steps: int = 300
    max_minutes: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float | None = None
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    precision: str = "auto"
    eval_every: int = 50  # 0: evaluate only at the end
    patience: int = 0  # stop after this many evaluations without improvement; 0: never
    log_every: int = 10
    seed: int = 0
    lora_rank: int = 0  # > 0: train LoRA adapters instead of the weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    qlora: bool = False  # LoRA over a frozen int8 copy of the base

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "patience", "lora_rank", "weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, not {self.lr}")
        if self.qlora and not self.lora_rank:
            raise InputError("--qlora trains LoRA adapters over an int8 base; give --lora-rank R too")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_lora(backbone: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Freeze `backbone` (int8 under QLoRA) and add the `default` adapter; [] without LoRA."""
    if not cfg.lora_rank:
        return []
    if cfg.qlora:
        quantize_int8(backbone)
    return inject_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


@dataclass
class FitResult:
    steps: int
    best_step: int
    best: dict[str, float]  # validation metrics at the best evaluation (restored into the model)
    history: list[dict[str, Any]]  # validation metrics per evaluation, from step 0 (before training)
    trainable: int
    total: int
    step_seconds: float  # median wall time of one optimizer step
    peak_memory_mb: float  # peak RSS (CPU) or peak CUDA memory during training
    stopped_early: bool


def fit(
    model: nn.Module,
    objective: Objective,
    train: Sequence[Any],
    val: Sequence[Any],
    cfg: FinetuneConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train the trainable parameters of `model` on prepared `train` examples; evaluate on `val`
    every `eval_every` steps and at the end, keep the best evaluation's weights, and stop early
    after `patience` evaluations without improvement. Logs go to `run_dir/metrics.jsonl`."""
    if not len(train):
        raise InputError("no training examples")
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.999))
    if not any(g["params"] for g in optimizer.param_groups):
        raise InputError("nothing to train: every parameter is frozen")
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    counts = trainable_parameters(model)
    log = MetricsLog(run_dir / "metrics.jsonl")
    order = _Order(len(train), cfg.seed)
    best, best_step, best_state, history = None, 0, None, []
    evals_without_gain, step, stopped_early = 0, 0, False
    times: list[float] = []
    _reset_peak_memory(device)
    start = time.perf_counter()
    if len(val):  # the starting point, so every run shows how far training moved it
        start_metrics = objective.evaluate(model, val)
        history.append({"step": 0, **start_metrics})
        log.write({"step": 0, **{f"val_{k}": v for k, v in start_metrics.items()}})
    bar = tqdm(total=cfg.max_steps, desc=objective.name, unit="step", disable=not progress)
    model.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.final_lr, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logs: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in objective.collate([train[i] for i in order.take(cfg.batch_size)]).items()}
            with precision.autocast():
                loss, parts = objective.loss(model, batch)
            (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.item(), **parts}.items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        times.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > cfg.max_minutes * 60
        last = step == cfg.max_steps or out_of_time
        if step % cfg.log_every == 0 or last:
            log.write({"step": step, **logs, "lr": lr, "grad_norm": grad_norm.item()})
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            metrics = objective.evaluate(model, val) if len(val) else {}
            model.train()
            history.append({"step": step, **metrics})
            log.write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
            if on_eval:
                on_eval(step, metrics)
            value = metrics.get(objective.metric)
            if value is None:  # no validation set: the last weights are the result
                best, best_step = metrics, step
            elif best is None or _better(value, best[objective.metric], objective.higher_is_better):
                best, best_step, evals_without_gain = metrics, step, 0
                best_state = {id(p): p.detach().clone() for p in trainable}
            else:
                evals_without_gain += 1
                if cfg.patience and evals_without_gain >= cfg.patience:
                    stopped_early = True
                    bar.write(f"early stop at step {step}: no better {objective.metric} for {cfg.patience} evaluations")
                    break
        if last:
            break
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p in trainable:
                p.copy_(best_state[id(p)])
    model.eval()
    return FitResult(step, best_step, best or {}, history, *counts, _median(times), _peak_memory_mb(device), stopped_early)


def _better(value: float, best: float, higher: bool) -> bool:
    return value > best if higher else value < best


class _Order:
    """Seeded epochs of shuffled example indices."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator, self.queue = n, torch.Generator().manual_seed(seed), []

    def take(self, k: int) -> list[int]:
        while len(self.queue) < k:
            self.queue += torch.randperm(self.n, generator=self.generator).tolist()
        out, self.queue = self.queue[:k], self.queue[k:]
        return out


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else math.nan


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA allocation, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
