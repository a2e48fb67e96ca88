"""Run settings as JSON-serializable data: `TrainConfig` (pretraining), `FinetuneConfig` (every
`slmkit finetune` task), and recipe files that hold them.

A recipe file (YAML or JSON) holds the same keys as the command's flags; flags override the
recipe, and unknown keys are an error that suggests the closest one. The config is saved in the
run directory so that `--resume` continues the run as it was set up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from slmkit.config import check_keys
from slmkit.errors import InputError, MissingExtraError
from slmkit.train.schedule import derived_warmup
from slmkit.train.trackers import check_tracker_names

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")  # see slmkit.train.parallel


class _RunSettings:
    """Checks and derived values that both configs share."""

    default_warmup: ClassVar[int]

    def _check(self, at_least_one: tuple[str, ...], not_negative: tuple[str, ...]) -> None:
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in not_negative:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, not {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise InputError(f"min_lr must be in [0, lr={self.lr}], not {self.min_lr}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        check_tracker_names(self.log_to)

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def warmup(self) -> int:
        """The given warmup, or one derived from the run length (`derived_warmup`)."""
        return self.warmup_steps if self.warmup_steps is not None else derived_warmup(self.max_steps, self.default_warmup)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig(_RunSettings):
    data: str  # token shards directory from `slmkit data prepare`
    out: str  # run directory
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (`--set k=v`)
    tokenizer: str | None = None  # None: the --init model's, else the copy in DATA (see setup.load_tokenizer)
    init: str | None = None  # a model directory to continue pretraining from
    seq_len: int | None = None  # tokens per training window; None: the model's context
    max_steps: int = 1000
    max_minutes: float | None = None  # stop earlier (after a final checkpoint) when time is up
    batch_size: int = 8  # rows per micro-step, summed over all ranks
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int | None = None  # None: min(100, 10% of max_steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # over torchrun's processes: ddp (replicate) or fsdp (shard: FSDP2 + sharded checkpoints)
    cpu_offload: bool = False  # fsdp on CUDA: parameter shards and the optimizer step on the CPU
    eval_every: int = 200  # 0: no validation
    eval_batches: int = 20
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    peak_flops: float | None = None  # per device, for MFU; None: measured with a matmul
    log_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow

    default_warmup: ClassVar[int] = 100

    def __post_init__(self) -> None:
        self._check(("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "log_every"),
                    ("warmup_steps", "eval_every", "save_every", "weight_decay", "clip"))
        if self.seq_len is not None and self.seq_len < 1:
            raise InputError(f"seq_len must be at least 1, not {self.seq_len}")
        if not isinstance(self.model, dict):
            raise InputError(f"model must be a mapping of ModelConfig overrides, not {self.model!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        check_keys(values, cls)
        missing = [f.name for f in fields(cls) if f.name in ("data", "out") and f.name not in values]
        if missing:
            raise InputError(f"missing required setting(s): {', '.join(missing)} (e.g. --{missing[0]} DIR)")
        return cls(**values)


@dataclass
class FinetuneConfig(_RunSettings):
    """The training flags shared by every `slmkit finetune` task."""

    max_steps: int = 300
    max_minutes: float | None = None
    batch_size: int = 8  # records per micro-step, summed over all ranks
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float | None = None
    warmup_steps: int | None = None  # None: min(10, 10% of max_steps)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0
    precision: str = "auto"
    activation_checkpointing: bool = False
    strategy: str = "ddp"
    cpu_offload: bool = False
    eval_every: int = 50  # 0: evaluate only at the end
    patience: int = 0  # stop after this many evaluations without improvement; 0: never
    log_every: int = 10
    save_every: int = 0  # 0: a checkpoint at the end only
    keep_checkpoints: int = 3
    seed: int = 0
    log_to: list[str] = field(default_factory=list)  # experiment trackers: tensorboard, wandb, mlflow
    lora_rank: int = 0  # > 0: train LoRA adapters instead of the weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    qlora: bool = False  # LoRA over a frozen int8 copy of the base

    default_warmup: ClassVar[int] = 10

    def __post_init__(self) -> None:
        self._check(("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"),
                    ("warmup_steps", "eval_every", "patience", "save_every", "lora_rank", "weight_decay", "clip"))
        if self.qlora and not self.lora_rank:
            raise InputError("--qlora trains LoRA adapters over an int8 base; give --lora-rank R too")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        values = {k.replace("-", "_"): v for k, v in values.items()}
        check_keys(values, cls)
        return cls(**values)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file -> dict of config keys. YAML needs PyYAML; JSON always works."""
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
