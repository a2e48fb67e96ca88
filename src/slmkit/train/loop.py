"""The training loop: pretraining and every fine-tuning task take the same optimizer steps.

Each step:

    1) batch     take batch_size * grad_accum examples from the data source, the same on every rank;
                 micro-step m on rank r of K trains on examples [m*B + r : (m+1)*B : K], so one process
                 and K processes see the same global batch, and grad_accum=2, batch_size=4 sees the
                 same examples as batch_size=8
    2) forward   the objective's loss plus the model's own terms (MoE balance loss, MTP loss), under autocast
    3) backward  through the GradScaler (a no-op unless fp16); DDP syncs gradients on the last micro-step
                 only, FSDP reduce-scatters them after each (`slmkit.train.parallel`)
    4) update    unscale, clip, optimizer step at the scheduled LR, then the MoE router-bias update from
                 the expert load of all ranks
    5) then      log; evaluate (keeping the best weights, stopping early); save a checkpoint

A checkpoint holds all that the next step depends on (optimizer, scaler, data position, objective
and RNG state, validation history), so a resumed run continues bit for bit; a sharded checkpoint
(FSDP) resumes on any number of processes (`slmkit.train.sharded`). What differs between
pretraining and the fine-tuning tasks is the data source (`slmkit.train.sources`) and the objective
(`slmkit.train.objectives`); `slmkit.train.trainer` and `slmkit.finetune` set them up.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit._io import atomic_dir
from slmkit.errors import InputError
from slmkit.model.lora import trainable_parameters
from slmkit.model.moe import ExpertLoad, balance_step
from slmkit.model.transformer import ModelOutput
from slmkit.train import checkpoint as ckpt
from slmkit.train import parallel, sharded
from slmkit.train.distributed import Dist
from slmkit.train.run_metrics import MetricsLog
from slmkit.train.objectives import Objective
from slmkit.train.objectives.lm import multi_token_loss
from slmkit.train.optim import build_optimizer
from slmkit.train.precision import resolve_precision
from slmkit.train.schedule import lr_at
from slmkit.train.sources import DataSource
from slmkit.train.trackers import open_trackers


class RunConfig(Protocol):
    """The settings the loop reads; `TrainConfig` and `FinetuneConfig` both have them."""

    max_steps: int
    max_minutes: float | None
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int | None  # None: derived from the run length (`warmup`)
    weight_decay: float
    beta1: float
    beta2: float
    clip: float
    precision: str
    eval_every: int
    log_every: int
    save_every: int
    keep_checkpoints: int
    seed: int
    log_to: list[str]
    strategy: str  # ddp | fsdp
    cpu_offload: bool
    activation_checkpointing: bool

    @property
    def final_lr(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class FitResult:
    steps: int
    best_step: int
    best: dict[str, float]  # validation metrics at the best evaluation (restored into the model when asked)
    history: list[dict[str, Any]]  # validation metrics per evaluation, from step 0 (before training)
    train_loss: float  # of the last step
    tokens: int  # input tokens trained on, all ranks
    tokens_per_s: float  # of the last step
    mfu: float  # of the last step; nan without a FLOP count
    trainable: int
    total: int
    step_seconds: float  # median wall time of one optimizer step
    peak_memory_mb: float  # peak RSS (CPU) or peak CUDA memory during training
    stopped_early: bool


def model_losses(model: nn.Module, output: ModelOutput | None, targets: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """What the model itself adds to any objective's loss, from that objective's training forward
    `output`: its MoE balance loss, and mtp_loss_weight * the multi-token loss against `targets` (the
    forward's next tokens; objectives without them, like classification, get no MTP term). None for
    a dense model without MTP."""
    if output is None:
        return None, {}
    transformer = getattr(model, "backbone", model)  # a classifier trains its backbone Transformer
    terms, logs = [], {}
    if output.aux_loss is not None:
        terms.append(output.aux_loss)
        logs["moe_aux_loss"] = output.aux_loss.detach()
    if output.mtp_logits and targets is not None:
        mtp = multi_token_loss(output.mtp_logits, targets)
        terms.append(transformer.cfg.mtp_loss_weight * mtp)
        logs["mtp_loss"] = mtp.detach()
    return (sum(terms) if terms else None), logs


def check_resume(model: nn.Module, state: dict[str, Any], strategy: str) -> None:
    """A checkpoint's trainer `state` can continue training `model` under `strategy`: an
    InputError otherwise, raised before a resumed run touches its directory."""
    if "sharded" in state:
        model_state = model.state_dict()
        names = ckpt.trained_names(model, [p for p in model.parameters() if p.requires_grad])
        sharded.check_fits(state["sharded"], {k: tuple(model_state[k].shape) for k in names})
    elif strategy == "fsdp":
        raise InputError("the run was checkpointed with --strategy ddp (whole-model checkpoints); resume it with --strategy ddp")
    elif "weights" in state:
        unexpected = set(state["weights"]) - set(model.state_dict())
        if unexpected:
            raise InputError(f"the checkpoint does not fit this run's model (e.g. {min(unexpected)}); "
                             "resume with the settings the run started with")


class Loop:
    """Train `model` on `objective` with examples from `data`; evaluate on `val` (None: never).

    `save_model(dir)` writes the model directory of a checkpoint. `state` (a checkpoint's trainer
    state) resumes a run; with `weights_in_state` the trained weights travel in it too (fine-tuning
    rebuilds its model as at the start; pretraining reloads the checkpoint's model directory).
    `restore_best` puts the best evaluation's weights back at the end; `patience` > 0 stops after
    that many evaluations without improvement. `compile_example` (an input batch) asks for
    torch.compile; `flops_per_token` and `peak_flops` give MFU. Under `cfg.strategy` fsdp the loop
    trains a sharded twin of `model` and puts the trained weights into `model` when `fit` ends.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        data: DataSource,
        val: Sequence[Any] | None,
        cfg: RunConfig,
        run_dir: Path,
        save_model: Callable[[Path], Any],
        *,
        state: dict[str, Any] | None = None,
        dist: Dist | None = None,
        compile_example: torch.Tensor | None = None,
        weights_in_state: bool = False,
        restore_best: bool = False,
        patience: int = 0,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.objective, self.data, self.val, self.cfg = model, objective, data, val or None, cfg
        self.run, self.save_model, self.progress = Path(run_dir), save_model, progress
        self.dist = dist or Dist(device=next(model.parameters()).device)
        self.weights_in_state, self.restore_best, self.patience = weights_in_state, restore_best, patience
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.precision = resolve_precision(cfg.precision, self.dist.device)
        parallel.check(cfg, self.dist)
        if not any(p.requires_grad for p in model.parameters()):
            raise InputError("nothing to train: every parameter is frozen")
        if state is not None:
            check_resume(model, state, cfg.strategy)
        self.saver = None
        if cfg.strategy == "fsdp":
            self._write_initial()
        # the module that trains: `model` itself, or (fsdp) its sharded twin
        self.parallel = parallel.wrap(model, cfg, self.dist, self.precision, compile_example)
        self.model, self.forward_model = self.parallel.model, self.parallel.forward
        if self.parallel.sharded:
            self.saver = sharded.ShardedSaver(self.run, cfg.keep_checkpoints, self.dist)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # named now, while every shard is in place (FSDP keeps the root's weights gathered after an eval forward)
        self.trained = sorted(ckpt.trained_names(self.model, self.params))
        self.scaler = self.parallel.scaler()

        self.step, self.tokens, self.history = 0, 0, []
        self.best, self.best_step, self.best_weights = None, 0, None
        self.evals_without_gain, self.stopped_early = 0, False
        torch.manual_seed(cfg.seed)
        if state is not None:
            self.load_state_dict(state)
        self.log = None
        if self.dist.main:
            trackers = open_trackers(cfg.log_to, self.run, cfg.to_dict())
            self.log = MetricsLog(self.run / "metrics.jsonl", self.step if state is not None else None, trackers)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FitResult:
        cfg, dist = self.cfg, self.dist
        if dist.main and cfg.warmup_steps is None:
            print(f"warmup: {cfg.warmup} steps, derived from the run's {cfg.max_steps} steps, at most 10% of them; "
                  "pass --warmup-steps N to choose")
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.objective.name, unit="step",
                   disable=not (self.progress and dist.main))
        _reset_peak_memory(dist.device)
        if self.step == 0 and self.val is not None:
            self.validate(bar)  # the starting point, so every run shows how far training moved it
        start, times = time.perf_counter(), []
        loss, tok_s, mfu = math.nan, 0.0, math.nan
        self.model.train()
        while self.step < cfg.max_steps and not self.stopped_early:
            t0 = time.perf_counter()
            lr = lr_at(self.step, cfg.lr, cfg.final_lr, cfg.warmup, cfg.max_steps)
            logs, tokens = self.train_step(lr)
            times.append(time.perf_counter() - t0)
            self.step += 1
            self.tokens += tokens
            loss, tok_s = logs["loss"], tokens / times[-1]
            record = {"step": self.step, **logs, "lr": lr, "tokens": self.tokens, "tok_s": tok_s}
            if self.flops_per_token and self.peak_flops:
                record["mfu"] = mfu = tok_s * self.flops_per_token / (self.peak_flops * dist.world)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            # 5) log, evaluate, save
            last = self.step == cfg.max_steps or self._out_of_time(start)
            if self.log and (self.step % cfg.log_every == 0 or last):
                self.log.write(record)
            if self.val is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                last = self.validate(bar) or last
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save_checkpoint()
            if last:
                break
        bar.close()
        if self.log:
            self.log.close()
        if self.saver is not None:
            self.saver.wait()
        if self.best_weights is not None:
            self._load_weights(self.best_weights)
        self.model = self.parallel.finish()
        self.model.eval()
        best_step = self.best_step if self.best is not None else self.step
        return FitResult(self.step, best_step, self.best or {}, self.history, loss, self.tokens, tok_s, mfu,
                         *trainable_parameters(self.model), _median(times), _peak_memory_mb(dist.device), self.stopped_early)

    def train_step(self, lr: float) -> tuple[dict[str, Any], int]:
        """One optimizer step; (logs averaged over micro-steps and ranks, input tokens over all ranks)."""
        cfg, dist = self.cfg, self.dist
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # 1) batch
        examples = self.data.take(cfg.batch_size * cfg.grad_accum)
        sums: dict[str, Any] = {}
        loads: list[ExpertLoad | None] = []  # per micro-step, for the router's bias update
        tokens = torch.zeros((), dtype=torch.long, device=dist.device)
        for m in range(cfg.grad_accum):
            part = examples[m * cfg.batch_size + dist.rank : (m + 1) * cfg.batch_size : dist.world]
            batch = {k: v.to(dist.device) if isinstance(v, torch.Tensor) else v for k, v in self.objective.collate(part).items()}
            tokens += batch["input_ids"].numel()
            with self.parallel.no_sync(last=m == cfg.grad_accum - 1):
                # 2) forward: the objective's loss and the model's own terms
                with self.precision.autocast():
                    step = self.objective.loss(self.forward_model, batch)
                    extra, extra_logs = model_losses(self.model, step.forward, step.targets)
                # 3) backward
                self.scaler.scale((step.loss if extra is None else step.loss + extra) / cfg.grad_accum).backward()
            loads.append(step.forward.expert_load if step.forward is not None else None)
            for k, v in {"loss": step.loss.detach(), **step.logs, **extra_logs}.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            del step  # the logits need not outlive their micro-step
        # 4) update
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip if cfg.clip else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # auxiliary-loss-free router-bias update from this step's expert load, summed over ranks so every rank moves alike
        loads = [ExpertLoad(dist.sum(x.load), dist.sum(x.dropped)) if x is not None else None for x in loads]
        moe_stats = balance_step(self.model, loads)
        means = dist.mean(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=dist.device) for v in sums.values()]))
        return {**dict(zip(sums, means.tolist())), "grad_norm": parallel.scalar(grad_norm), **moe_stats}, int(dist.sum(tokens))

    def validate(self, bar: tqdm) -> bool:
        """Evaluate on `val`, log it, keep the best weights; True when early stopping says stop.
        Every rank evaluates all of `val` (identical results, so every rank decides alike)."""
        with self.precision.autocast():
            metrics = self.objective.evaluate(self.model, self.val)
        self.model.train()
        self.history.append({"step": self.step, **metrics})
        if self.log:
            self.log.write({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}})
            if self.progress:
                bar.write(f"step {self.step}: val " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.step == 0:
            return False
        value = metrics[self.objective.metric]
        if self.best is None or (value > self.best[self.objective.metric] if self.objective.higher_is_better
                                 else value < self.best[self.objective.metric]):
            self.best, self.best_step, self.evals_without_gain = metrics, self.step, 0
            if self.restore_best:
                self.best_weights = self._trained_weights()
        else:
            self.evals_without_gain += 1
            if self.patience and self.evals_without_gain >= self.patience:
                self.stopped_early = True
                bar.write(f"early stop at step {self.step}: no better {self.objective.metric} in {self.patience} evaluations")
        return self.stopped_early

    def _out_of_time(self, start: float) -> bool:
        if self.cfg.max_minutes is None:
            return False
        return self.dist.any(time.perf_counter() - start > self.cfg.max_minutes * 60)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        if self.saver is not None:  # every rank writes its shards; rank 0 the plain state
            self.saver.save(self.step, self.state_dict(), self._sharded_tensors())
            return
        if self.dist.main:
            ckpt.save_checkpoint(self.run, self.step, self.save_model, self.state_dict(), self.cfg.keep_checkpoints)
        self.dist.barrier()

    def _write_initial(self) -> None:
        """A sharded run's checkpoints hold weights only; their model directory is the starting one."""
        initial = ckpt.initial_dir(self.run)
        if self.dist.main and not (initial / "config.json").is_file():
            with atomic_dir(initial, force=True) as tmp:
                self.save_model(tmp)
        self.dist.barrier()

    def _sharded_tensors(self) -> dict[str, Any]:
        """What a sharded checkpoint's DCP directory holds: this rank's shards of the trained
        weights, the optimizer state (by parameter name) and the best evaluation's weights."""
        state = self.model.state_dict()
        tensors = {"model": {k: state[k] for k in self.trained},
                   "optimizer": sharded.optimizer_state(self.model, self.optimizer)}
        if self.best_weights is not None:
            tensors["best"] = self.best_weights
        return tensors

    def state_dict(self) -> dict[str, Any]:
        """The plain state of a checkpoint (under FSDP the tensors go to `_sharded_tensors`)."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "scaler": self.scaler.state_dict(),
            "data": self.data.state_dict(),
            "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else {},
            "rng": ckpt.rng_state(),
            "history": self.history,
            "best": self.best,
            "best_step": self.best_step,
            "evals_without_gain": self.evals_without_gain,
            "stopped_early": self.stopped_early,
        }
        if self.saver is not None:
            state["has_best_weights"] = self.best_weights is not None
        else:
            state["optimizer"] = self.optimizer.state_dict()
            state["best_weights"] = self.best_weights
            if self.weights_in_state:
                state["weights"] = self._trained_weights()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sharded" in state:
            self._load_sharded(state["sharded"], state["has_best_weights"])
        else:
            if self.weights_in_state:
                self._load_weights(state["weights"])
            self.best_weights = state["best_weights"]
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_gain, self.stopped_early = state["evals_without_gain"], state["stopped_early"]
        self.scaler.load_state_dict(state["scaler"])
        self.data.load_state_dict(state["data"])
        if hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        ckpt.set_rng_state(state["rng"])

    def _load_sharded(self, checkpoint, has_best: bool) -> None:
        """Weights, optimizer state and best weights from a sharded checkpoint, resharded to
        however many ranks this run has (the weights in place, into the shards that train)."""
        state = self.model.state_dict()
        tensors = {"model": {k: state[k] for k in self.trained},
                   "optimizer": sharded.optimizer_state(self.model, self.optimizer)}
        if has_best:
            tensors["best"] = {k: state[k].detach().clone() for k in self.trained}
        sharded.load(checkpoint, tensors)
        sharded.load_optimizer(self.model, self.optimizer, tensors["optimizer"])
        self.best_weights = tensors.get("best")

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """What training changes (`checkpoint.trained_names`), copied."""
        state = self.model.state_dict()
        return {k: state[k].detach().clone() for k in self.trained}

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        unexpected = self.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise InputError(f"the checkpoint does not fit this run's model (e.g. {unexpected[0]}); "
                             "resume with the settings the run started with")


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

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
