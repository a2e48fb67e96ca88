"""The pretraining loop: one optimizer step at a time, with eval, logging and checkpoints.

Data is drawn identically by every rank: each optimizer step takes one globally seeded batch of
`batch_size * grad_accum` windows, micro-step m uses rows [m*B, (m+1)*B), and rank r of K takes
rows r::K of those. One process and K processes therefore see the same global batch, and
`grad_accum=2, batch_size=4` sees the same rows as `batch_size=8`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from slmkit._io import atomic_dir, write_json
from slmkit.data import RandomWindowSampler, SlidingWindowDataset, read_manifest
from slmkit.errors import InputError, OutputExistsError
from slmkit.model.io import save_model_dir
from slmkit.model.moe import balance_step
from slmkit.train import checkpoint as ckpt
from slmkit.train.accel import compile_or_eager, enable_activation_checkpointing
from slmkit.train.config import TrainConfig
from slmkit.train.distributed import setup as setup_distributed
from slmkit.train.metrics import (
    MetricsLog,
    flops_per_token,
    measure_peak_flops,
    read_metrics,
)
from slmkit.train.objectives import objective_for
from slmkit.train.optim import build_optimizer
from slmkit.train.precision import resolve_precision
from slmkit.train.report import plot_losses, write_report
from slmkit.train.schedule import lr_at
from slmkit.train.trackers import open_trackers
from slmkit.train.setup import build_model, load_tokenizer


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
    """Set up a run (fresh, resumed or from --init) and `fit()` it.

    `resume=True` continues from the newest complete checkpoint in `cfg.out` (or starts fresh when
    there is none); `force=True` deletes an existing `cfg.out` first.
    """

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.dist = setup_distributed()
        self.run = Path(cfg.out)
        self.step, self.tokens = 0, 0
        if cfg.batch_size % self.dist.world:
            raise InputError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {self.dist.world}")
        if self.run.exists() and not (resume or force):
            raise OutputExistsError(f"run directory {self.run} already exists; pass --resume to continue it or --force to start over")
        self.dist.barrier()  # every rank checks before rank 0 creates it

        self.tokenizer = load_tokenizer(cfg)
        latest = ckpt.complete_checkpoints(self.run)[-1:] if resume else []
        if latest:
            model, state = ckpt.load_checkpoint(latest[0])
        else:
            model, state = build_model(cfg, self.tokenizer), None
        self.model = model.to(self.dist.device)
        self.model_cfg = model.cfg
        self.precision = resolve_precision(cfg.precision, self.dist.device)
        self.objective = objective_for(model.cfg, self.tokenizer, cfg.seed)
        self.sampler = RandomWindowSampler(cfg.data, model.cfg.context_length, "train", cfg.seed)
        self.val = self._validation_set()
        self._prepare_run_dir(fresh=force and not resume)  # only once the inputs proved usable
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scaler = self.precision.scaler()
        if state is not None:
            self._load_state(state)
        self.log = None
        if self.dist.main:
            trackers = open_trackers(cfg.log_to, self.run, cfg.to_dict())
            self.log = MetricsLog(self.run / "metrics.jsonl", self.step if latest else None, trackers)

        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.forward_model = model
        if cfg.compile:
            example = torch.zeros(1, model.cfg.context_length, dtype=torch.long, device=self.dist.device)
            self.forward_model = compile_or_eager(model, example)
        if self.dist.enabled:
            self.forward_model = DistributedDataParallel(self.forward_model)
        self.flops_per_token = flops_per_token(model)
        self.peak_flops = cfg.peak_flops or measure_peak_flops(self.dist.device, self.precision.dtype)

    # ------------------------------------------------------------------ setup
    def _prepare_run_dir(self, fresh: bool) -> None:
        if self.dist.main:
            if fresh and self.run.exists():
                shutil.rmtree(self.run)
            self.run.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_saves(self.run)
            write_json(self.run / "train_config.json", self.cfg.to_dict())
        self.dist.barrier()

    def _validation_set(self) -> SlidingWindowDataset | None:
        if not self.cfg.eval_every:
            return None
        if read_manifest(self.cfg.data)["splits"].get("val", {}).get("tokens", 0) <= self.model_cfg.context_length:
            raise InputError(f"{self.cfg.data} has too little validation data for context {self.model_cfg.context_length}; "
                             "prepare it with a larger --val-fraction or pass --eval-every 0")
        return SlidingWindowDataset(self.cfg.data, self.model_cfg.context_length, split="val")

    def _state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.generator.get_state(),
            "objective": self.objective.state_dict(),
            "rng": ckpt.rng_state(),
        }

    def _load_state(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.generator.set_state(state["sampler"])
        self.objective.load_state_dict(state["objective"])
        ckpt.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        cfg, dist = self.cfg, self.dist
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_cfg.context_length
        start = time.perf_counter()
        loss, val_loss, tok_s, mfu = math.nan, math.nan, 0.0, 0.0
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="pretrain", unit="step", disable=not (self.progress and dist.main))
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.lr, cfg.final_lr, cfg.warmup_steps, cfg.max_steps)
            loss, grad_norm, moe_stats = self.train_step(lr)
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens += tokens_per_step
            tok_s = tokens_per_step / dt
            mfu = tok_s * self.flops_per_token / (self.peak_flops * dist.world)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            last = self.step == cfg.max_steps or self._out_of_time(start)
            if self.log and (self.step % cfg.log_every == 0 or last):
                self.log.write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                                "tok_s": tok_s, "mfu": mfu, **moe_stats})
            if self.val is not None and (self.step % cfg.eval_every == 0 or last):
                val_loss = self.evaluate()
                if self.log:
                    bar.write(f"step {self.step}: val loss {val_loss:.4f}, ppl {math.exp(val_loss):.2f}")
                    self.log.write({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save_checkpoint()
            if last:
                break
        bar.close()
        if self.log:
            self.log.close()
        result = TrainResult(self.run, self.step, self.tokens, loss, val_loss, tok_s, mfu)
        if dist.main:
            self._finish(result)
        dist.barrier()
        dist.close()
        return result

    def train_step(self, lr: float) -> tuple[float, float, dict]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss over ranks, grad norm,
        per-layer MoE expert utilization; empty for dense models)."""
        cfg, dist = self.cfg, self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.sampler.get_batch(cfg.batch_size * cfg.grad_accum)
        inputs, targets = self.objective.batch(x, y)
        total = torch.zeros((), device=dist.device)
        loads = []  # expert load of each micro-batch, for the auxiliary-loss-free bias update
        for m in range(cfg.grad_accum):
            rows = slice(m * cfg.batch_size + dist.rank, (m + 1) * cfg.batch_size, dist.world)
            xb, tb = inputs[rows].to(dist.device), targets[rows].to(dist.device)
            syncing = m == cfg.grad_accum - 1 or not dist.enabled
            with self.forward_model.no_sync() if not syncing else contextlib.nullcontext():
                with self.precision.autocast():
                    output = self.forward_model(xb, targets=tb)  # logits, MTP logits, MoE balance loss and load
                    loss = self.objective.loss(output.logits, tb)
                    extra = self.objective.extra_loss(self.model, output, tb)  # MoE balance, MTP
                    loads.append(output.expert_load)
                    del output  # its logits need not outlive the loss
                self.scaler.scale((loss if extra is None else loss + extra) / cfg.grad_accum).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        moe_stats = balance_step(self.model, loads)  # auxiliary-loss-free bias update from this step's load
        return dist.mean(total / cfg.grad_accum).item(), grad_norm.item(), moe_stats

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches * batch_size` disjoint validation windows (fixed
        windows and, for MLM, fixed masks, so evaluations are comparable across steps)."""
        cfg, dist = self.cfg, self.dist
        objective = objective_for(self.model_cfg, self.tokenizer, cfg.seed)
        n = min(len(self.val), cfg.eval_batches * cfg.batch_size)
        loss_sum = torch.zeros((), device=dist.device)
        count = torch.zeros((), device=dist.device)
        self.model.eval()
        for first in range(0, n, cfg.batch_size):
            pairs = [self.val[i] for i in range(first, min(n, first + cfg.batch_size))]
            inputs, targets = objective.batch(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
            xb, tb = inputs[dist.rank :: dist.world].to(dist.device), targets[dist.rank :: dist.world].to(dist.device)
            if not len(xb):
                continue
            with self.precision.autocast():
                logits = self.model(xb)
            counted = (tb != -100).sum()
            loss_sum += objective.loss(logits, tb) * counted
            count += counted
        self.model.train()
        return (dist.sum(loss_sum) / dist.sum(count)).item()

    def _out_of_time(self, start: float) -> bool:
        if self.cfg.max_minutes is None:
            return False
        return self.dist.any(time.perf_counter() - start > self.cfg.max_minutes * 60)

    def save_checkpoint(self) -> None:
        if self.dist.main:
            ckpt.save_checkpoint(self.run, self.step, self.model, self.tokenizer, self._state(), self.cfg.keep_checkpoints)
        self.dist.barrier()

    def _finish(self, result: TrainResult) -> None:
        with atomic_dir(self.run / "final", force=True) as tmp:
            save_model_dir(self.model, tmp, self.tokenizer)
        plotted = plot_losses(read_metrics(self.run / "metrics.jsonl"), self.run / "loss.png")
        summary = {
            "parameters": self.model.num_parameters(),
            "non-embedding parameters": self.model.num_parameters(embedding=False),
            "objective": self.objective.name,
            "precision": self.precision.name,
            "processes": self.dist.world,
            "steps": result.steps,
            "tokens": result.tokens,
            "final train loss": result.train_loss,
            "final val loss": result.val_loss,
            "final val perplexity": result.val_ppl,
            "tokens/s (last step)": result.tokens_per_s,
            "MFU (last step)": result.mfu,
            "peak FLOP/s per device": self.peak_flops,
        }
        write_report(self.run / "report.md", summary, self.cfg.to_dict(), self.model_cfg.to_dict(), plotted)


def pretrain(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool = True) -> TrainResult:
    """Pretrain a model as `cfg` says; see `Trainer`."""
    return Trainer(cfg, resume=resume, force=force, progress=progress).fit()
