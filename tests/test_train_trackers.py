"""Experiment trackers receive exactly the records that metrics.jsonl gets."""

from __future__ import annotations

import sys
import types

import pytest
from train_helpers import run

from slmkit.errors import InputError, MissingExtraError
from slmkit.train import TrainConfig
from slmkit.train.trackers import open_trackers


def test_tensorboard_gets_every_logged_scalar(verdict, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = run(verdict, tmp_path / "run", max_steps=4, log_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert {"lr", "grad_norm", "tok_s", "mfu"} <= set(events.Tags()["scalars"])


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_run_gets_records_and_config(verdict, tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = run(verdict, tmp_path / "run", max_steps=3, log_to=["wandb"])
    (wb,) = runs
    assert wb.init["name"] == "run" and wb.init["config"]["max_steps"] == 3
    assert [step for step, _ in wb.logged] == [r["step"] for r in records]
    assert wb.logged[0][1]["loss"] == pytest.approx(records[0]["loss"])
    assert wb.finished


def test_mlflow_run_gets_metrics_and_params(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    for name in ("start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **kw: calls.append((_name, a, kw)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    (tracker,) = open_trackers(["mlflow"], tmp_path / "myrun", {"lr": 0.001, "model": {"d_model": 64}})
    tracker.log({"step": 5, "loss": 2.5, "note": "text is not a metric"})
    tracker.close()
    assert [c[0] for c in calls] == ["start_run", "log_params", "log_metrics", "end_run"]
    assert calls[0][2] == {"run_name": "myrun"}
    assert calls[1][1][0] == {"lr": "0.001", "model": "{'d_model': 64}"}
    assert calls[2][1][0] == {"loss": 2.5} and calls[2][2] == {"step": 5}


def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(MissingExtraError, match=r"pip install 'slmkit\[wandb\]'"):
        open_trackers(["wandb"], tmp_path, {})


def test_unknown_tracker_is_rejected_before_training(tmp_path):
    with pytest.raises(InputError, match="unknown tracker 'tensorbord'"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), log_to=["tensorbord"])
