"""Experiment trackers fed the same records as `metrics.jsonl`: TensorBoard, Weights & Biases,
MLflow. Each is used only when asked for (`--log-to tensorboard,wandb`) and imported only then,
so none of them is ever a requirement.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from slmkit.errors import InputError, MissingExtraError


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, module) from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardTracker:
    """Event files under RUN_DIR/tensorboard: `tensorboard --logdir RUN_DIR/tensorboard`."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("train_config", f"```\n{config}\n```")

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run directory (offline too: set WANDB_MODE=offline)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.wandb = _require("wandb")
        self.run = self.wandb.init(project="slmkit", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the current tracking store (MLFLOW_TRACKING_URI, default ./mlruns)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.mlflow = _require("mlflow")
        self.mlflow.start_run(run_name=run_dir.name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})  # MLflow caps param length

    def log(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def check_tracker_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise InputError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Tracker]:
    check_tracker_names(names)
    return [TRACKERS[name](run_dir, config) for name in names]
