"""Pretraining: set up a run on token shards (fresh, resumed or from --init) and run the training
loop (`slmkit.train.loop`) on random windows, with the `lm` or `mlm` objective.

Every rank draws the same globally seeded batch of `batch_size * grad_accum` windows per step and
trains on its share (see the loop), so one process and K processes see the same global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from slmkit._io import atomic_dir
from slmkit.data import RandomWindowSampler, SlidingWindowDataset, read_manifest
from slmkit.errors import InputError
from slmkit.model.io import save_model_dir
from slmkit.train import checkpoint as ckpt
from slmkit.train import parallel
from slmkit.train.distributed import setup as setup_distributed
from slmkit.train.loop import FitResult, Loop
from slmkit.train.run_metrics import flops_per_token, measure_peak_flops, read_metrics
from slmkit.train.objectives import objective_for
from slmkit.train.precision import resolve_precision
from slmkit.train.recipe import TrainConfig
from slmkit.train.report import plot_losses, write_report
from slmkit.train.setup import build_model, load_tokenizer
from slmkit.train.sources import RandomWindows


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_loss: float
    val_loss: float  # nan when validation is off
    tokens_per_s: float
    mfu: float

    @property
    def val_ppl(self) -> float:
        return math.exp(self.val_loss) if not math.isnan(self.val_loss) else math.nan


class Trainer:
    """Set up a pretraining run and `fit()` it.

    `resume=True` continues from the newest complete checkpoint in `cfg.out` (or starts fresh when
    there is none); `force=True` deletes an existing `cfg.out` first.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.dist = dist = setup_distributed()
        self.run = Path(cfg.out)
        parallel.check(cfg, dist)
        ckpt.check_run_dir(self.run, resume, force)
        dist.barrier()  # every rank checks before rank 0 creates it

        self.tokenizer = load_tokenizer(cfg)
        latest = ckpt.latest_checkpoint(self.run) if resume else None
        model, state = ckpt.load_checkpoint(latest) if latest else (build_model(cfg, self.tokenizer), None)
        self.model = model.to(dist.device)
        self.seq_len = cfg.seq_len or model.cfg.context_length  # windows shorter than the context: cheaper steps
        if self.seq_len > model.cfg.context_length:
            raise InputError(f"seq_len {self.seq_len} is longer than the model's context of {model.cfg.context_length} tokens")
        self.objective = objective_for(model.cfg, self.tokenizer, cfg.seed, eval_batch_size=cfg.batch_size)
        sampler = RandomWindowSampler(cfg.data, self.seq_len, "train", cfg.seed)
        val = self._validation_windows()
        if dist.main:  # only once the inputs proved usable
            ckpt.prepare_run_dir(self.run, force and not resume, "train_config.json", cfg.to_dict())
        dist.barrier()

        example = torch.zeros(1, self.seq_len, dtype=torch.long, device=dist.device) if cfg.compile else None
        self.peak_flops = cfg.peak_flops or measure_peak_flops(dist.device, resolve_precision(cfg.precision, dist.device).dtype)
        self.loop = Loop(model, self.objective, RandomWindows(sampler, self.objective.batch), val, cfg, self.run,
                         lambda d: save_model_dir(model, d, self.tokenizer), state=state, dist=dist, compile_example=example,
                         flops_per_token=flops_per_token(model, self.seq_len), peak_flops=self.peak_flops, progress=progress)

    def _validation_windows(self) -> list | None:
        """The first `eval_batches * batch_size` disjoint validation windows (the same every time)."""
        cfg, context = self.cfg, self.seq_len
        if not cfg.eval_every:
            return None
        if read_manifest(cfg.data)["splits"].get("val", {}).get("tokens", 0) <= context:
            raise InputError(f"{cfg.data} has too little validation data for context {context}; "
                             "prepare it with a larger --val-fraction or pass --eval-every 0")
        windows = SlidingWindowDataset(cfg.data, context, split="val")
        return [windows[i] for i in range(min(len(windows), cfg.eval_batches * cfg.batch_size))]

    def fit(self) -> TrainResult:
        fit = self.loop.fit()
        val_loss = fit.history[-1]["loss"] if fit.history else math.nan
        result = TrainResult(self.run, fit.steps, fit.tokens, fit.train_loss, val_loss, fit.tokens_per_s, fit.mfu)
        if self.dist.main:
            self._finish(result, fit)
        self.dist.barrier()
        self.dist.close()
        return result

    def _finish(self, result: TrainResult, fit: FitResult) -> None:
        with atomic_dir(self.run / "final", force=True) as tmp:
            save_model_dir(self.model, tmp, self.tokenizer)
        plotted = plot_losses(read_metrics(self.run / "metrics.jsonl"), self.run / "loss.png")
        summary = {
            "parameters": self.model.num_parameters(),
            "non-embedding parameters": self.model.num_parameters(embedding=False),
            "objective": self.objective.name,
            "precision": self.loop.precision.name,
            "processes": self.dist.world,
            "strategy": self.cfg.strategy,
            "steps": result.steps,
            "warmup steps": f"{self.cfg.warmup}" + (" (derived from the run length)" if self.cfg.warmup_steps is None else ""),
            "tokens": result.tokens,
            "final train loss": result.train_loss,
            "final val loss": result.val_loss,
            "final val perplexity": result.val_ppl,
            "tokens/s (last step)": result.tokens_per_s,
            "MFU (last step)": result.mfu,
            "step time (s, median)": fit.step_seconds,
            "peak memory of rank 0 (MB)": fit.peak_memory_mb,
            "peak FLOP/s per device": self.peak_flops,
        }
        write_report(self.run / "report.md", summary, self.cfg.to_dict(), self.model.cfg.to_dict(), plotted)


def pretrain(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> TrainResult:
    """Pretrain a model as `cfg` says; see `Trainer`."""
    return Trainer(cfg, resume=resume, force=force, progress=progress).fit()
