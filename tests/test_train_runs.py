"""Training runs end to end on small real text: learning, resume, DDP, determinism, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file
from train_helpers import OVERFIT_MODEL, OVERFIT_STEPS, SMALL, losses, make_data, run

from slmkit.cli import main
from slmkit.data import load_shards
from slmkit.tokenizer import train_bpe
from slmkit.train.run_metrics import read_metrics

BIN = Path(sys.executable).parent


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, **kw)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in SMALL.items()]
    return ["pretrain", "-q", "--data", str(data), "--out", str(out), *sets, "--batch-size", "8", "--lr", "3e-3",
            "--warmup-steps", "2", "--log-every", "1", "--peak-flops", "1e11", *extra]


# ---------------------------------------------------------------------------- learning
@pytest.mark.slow  # ~6 min on one core
def test_overfits_the_verdict(verdict, tmp_path):
    start = time.perf_counter()
    records = run(verdict, tmp_path / "run", max_steps=OVERFIT_STEPS, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=10,
                  weight_decay=0.0, log_every=10, model=OVERFIT_MODEL)
    assert losses(records)[-1] < 0.1, losses(records)
    print(f"overfit in {time.perf_counter() - start:.1f} s")
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "final train loss" in report and "MFU" in report


def test_beats_unigram_on_tinyshakespeare(tmp_path):
    text = shared_path("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    data = make_data(text, tmp_path, 512)
    train = np.concatenate(load_shards(data, "train")).astype(np.int64)
    val = np.concatenate(load_shards(data, "val")).astype(np.int64)
    counts = np.bincount(train, minlength=512) + 1.0  # add-one smoothing
    unigram = float(-np.log(counts / counts.sum())[val].mean())
    records = run(data, tmp_path / "run", max_steps=100, batch_size=16, lr=5e-3, warmup_steps=5, eval_every=100, eval_batches=8,
                  model=dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, context_length=64))
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert val_loss < unigram - 0.3, (val_loss, unigram)


@pytest.mark.parametrize("model", [
    dict(pos="learned", norm="layernorm", mlp="gelu"),
    dict(pos="sinusoidal", mlp="gelu_tanh"),
    dict(pos="rope", mlp="swiglu"),
    dict(pos="alibi", mlp="geglu"),
    dict(pos="none", norm="layernorm"),
    dict(causal=False),  # masked-LM objective
])
def test_every_component_trains(verdict, tmp_path, model):
    loss = losses(run(verdict, tmp_path / "run", max_steps=20, warmup_steps=5, model=model))
    assert np.mean(loss[-5:]) < np.mean(loss[:3]) - 0.3, loss


def test_bf16_and_activation_checkpointing_train(verdict, tmp_path):
    reference = losses(run(verdict, tmp_path / "a", max_steps=4))
    assert losses(run(verdict, tmp_path / "b", max_steps=4, activation_checkpointing=True)) == pytest.approx(reference, rel=1e-5)
    bf16 = losses(run(verdict, tmp_path / "c", max_steps=4, precision="bf16"))
    assert bf16 == pytest.approx(reference, rel=0.05)


def test_compile_failure_falls_back_to_eager(verdict, tmp_path, monkeypatch):
    def broken(model, **kw):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    reference = losses(run(verdict, tmp_path / "a", max_steps=3))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert losses(run(verdict, tmp_path / "b", max_steps=3, compile=True)) == reference


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_losses(verdict, tmp_path):
    a = losses(run(verdict, tmp_path / "a", seed=3))
    assert a == losses(run(verdict, tmp_path / "b", seed=3))
    assert a != losses(run(verdict, tmp_path / "c", seed=4))


def test_grad_accumulation_equals_bigger_batch(verdict, tmp_path):
    big = losses(run(verdict, tmp_path / "a", max_steps=4, batch_size=8))
    accumulated = losses(run(verdict, tmp_path / "b", max_steps=4, batch_size=4, grad_accum=2))
    assert accumulated == pytest.approx(big, rel=1e-5)
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _training_curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(run_dir / "metrics.jsonl")]


def test_resume_after_sigkill_is_bit_identical(verdict, tmp_path):
    steps = ["--max-steps", "40", "--save-every", "5", "--eval-every", "10", "--eval-batches", "2"]
    whole = cli(*cli_args(verdict, tmp_path / "whole", *steps))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", *cli_args(verdict, out, *steps)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any((out / "checkpoints").glob("step-*")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it was killed"
    # a save that was killed halfway, and a checkpoint directory without its completion marker, are both skipped
    (out / "checkpoints" / ".step-35.x.tmp").mkdir()
    (out / "checkpoints" / "step-35").mkdir()
    resumed = cli(*cli_args(verdict, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr

    assert _training_curve(out) == _training_curve(tmp_path / "whole")
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((out / "checkpoints").glob("step-*"))) == 3  # --keep-checkpoints default


def test_two_process_ddp_matches_one_process(verdict, tmp_path):
    steps = ["--max-steps", "6", "--eval-every", "6", "--eval-batches", "2", "--save-every", "0"]
    single = cli(*cli_args(verdict, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "slmkit", *cli_args(verdict, tmp_path / "two", *steps)],
                         capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _training_curve(tmp_path / "one"), _training_curve(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two]
    for a, b in zip(one, two):
        assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-4)


# ---------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err


def test_bad_input_is_a_one_line_error(verdict, tmp_path, capsys):
    base = ["pretrain", "-q", "--data", str(verdict), "--out", str(tmp_path / "run"), "--max-steps", "2", "--eval-every", "0"]
    _one_line_error(capsys, [*base, "--preset", "tinyy"], "did you mean 'tiny'")
    _one_line_error(capsys, [*base, "--set", "n_layer=2"], "did you mean 'n_layers'")
    (tmp_path / "recipe.json").write_text(json.dumps({"max_step": 5}))
    _one_line_error(capsys, [*base, "--recipe", str(tmp_path / "recipe.json")], "did you mean 'max_steps'")

    other = train_bpe(["a completely different corpus"], 300)
    other.save(tmp_path / "other")
    _one_line_error(capsys, [*base, "--tokenizer", str(tmp_path / "other")], "data prepared with a different tokenizer than the model's (hash mismatch)")

    small = [f"--set={k}={v}" for k, v in SMALL.items()]
    assert main([*base, *small, "--save-every", "1", "--peak-flops", "1e11"]) == 0
    _one_line_error(capsys, [*base, *small], "already exists")
    _one_line_error(capsys, ["pretrain", "-q", "--data", str(verdict), "--out", str(tmp_path / "init"), "--init", str(tmp_path / "run" / "final"),
                             "--tokenizer", str(tmp_path / "other"), "--eval-every", "0"], "hash mismatch")
    weights = tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(capsys, [*base, *small, "--resume", "--max-steps", "4"], "corrupt")


def test_recipe_and_init(verdict, tmp_path):
    (tmp_path / "recipe.yaml").write_text("max_steps: 3\nbatch_size: 4\neval_every: 0\nmodel:\n  d_model: 32\n  n_layers: 1\n  context_length: 32\n")
    assert main(["pretrain", "-q", "--data", str(verdict), "--out", str(tmp_path / "a"), "--recipe", str(tmp_path / "recipe.yaml"),
                 "--max-steps", "2", "--peak-flops", "1e11"]) == 0
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["batch_size"] == 4 and saved["model"]["d_model"] == 32  # flags beat the recipe
    records = run(verdict, tmp_path / "b", max_steps=2, init=str(tmp_path / "a" / "final"))
    assert math.isfinite(losses(records)[-1])
    config = json.loads((tmp_path / "b" / "final" / "config.json").read_text())
    assert config["d_model"] == 32 and config["vocab_size"] == 512


def test_seq_len_trains_on_shorter_windows_and_keeps_the_models_context(verdict, tmp_path, capsys):
    records = run(verdict, tmp_path / "a", max_steps=2, batch_size=4, seq_len=16)
    assert [r["tokens"] for r in records if "loss" in r] == [64, 128]  # 4 windows of 16 tokens per step
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["context_length"] == SMALL["context_length"]
    _one_line_error(capsys, ["pretrain", "-q", "--data", str(verdict), "--out", str(tmp_path / "b"), "--init",
                             str(tmp_path / "a" / "final"), "--seq-len", "999"], "seq_len 999 is longer than the model's context")
    assert not (tmp_path / "b").exists()
