"""`TrainConfig`: everything that decides a pretraining run, as JSON-serializable data.

A recipe file (YAML or JSON) holds the same keys; CLI flags override the recipe. The config is
saved in the run directory so that `--resume` continues the run as it was set up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from slmkit.config import check_keys
from slmkit.errors import InputError, MissingExtraError
from slmkit.train.trackers import check_tracker_names

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    data: str  # token shards directory from `slmkit data prepare`
    out: str  # run directory
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (`--set k=v`)
    tokenizer: str | None = None  # None: the --init model's, else the copy in DATA (see setup.load_tokenizer)
    init: str | None = None  # a model directory to continue pretraining from
    max_steps: int = 1000
    max_minutes: float | None = None  # stop earlier (after a final checkpoint) when time is up
    batch_size: int = 8  # rows per micro-step, summed over all ranks
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 200  # 0: no validation
    eval_batches: int = 20
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    peak_flops: float | None = None  # per device, for MFU; None: measured with a matmul
    log_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative, not {getattr(self, name)}")
        check_tracker_names(self.log_to)
        if self.lr <= 0:
            raise InputError(f"lr must be positive, not {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise InputError(f"min_lr must be in [0, lr={self.lr}], not {self.min_lr}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.model, dict):
            raise InputError(f"model must be a mapping of ModelConfig overrides, not {self.model!r}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        check_keys(values, cls)
        missing = [f.name for f in fields(cls) if f.name in ("data", "out") and f.name not in values]
        if missing:
            raise InputError(f"missing required setting(s): {', '.join(missing)} (e.g. --{missing[0]} DIR)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file -> dict of TrainConfig keys. YAML needs PyYAML; JSON always works."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MissingExtraError("PyYAML (for YAML recipes; or write the recipe as JSON)", "dev") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"recipe {path} must hold a mapping of settings, not {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}
