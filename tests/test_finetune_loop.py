"""Fine-tuning runs in the one training loop: the model's MoE and MTP terms, fp16 loss scaling,
DDP, exact resume after SIGKILL, trackers, recipes, and a warmup that fits the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from specialize_fixtures import tiny_model_dir, write_json

from slmkit.cli import main
from slmkit.finetune import FinetuneConfig, finetune_sft
from slmkit.chat import ChatFormat
from slmkit.tokenizer import Tokenizer
from slmkit.train import TrainConfig
from slmkit.train import checkpoint as ckpt
from slmkit.train.run_metrics import read_metrics
from slmkit.train.precision import Precision

BIN = Path(sys.executable).parent
WORDS = ["win", "prize", "cash", "lunch", "home", "love", "tips", "sleep", "French", "world", "account", "meeting",
         "tomorrow", "reward", "holiday", "exercise"]


def records(n: int = 32) -> list[dict]:
    return [{"instruction": f"Say the word {WORDS[i % len(WORDS)]}.", "input": "", "output": WORDS[(i * 7) % len(WORDS)]}
            for i in range(n)]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def curve(run: Path) -> list[tuple]:
    keys = ("loss", "lr", "grad_norm", "val_loss")
    return [(r["step"], *(r.get(k) for k in keys)) for r in read_metrics(run / "metrics.jsonl")]


def sft_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "sft", str(model_dir), "--data", str(data), "--out", str(out), "-q", "--lr", "3e-3",
            "--warmup-steps", "2", "--log-every", "1", "--max-new-tokens", "2", "--max-responses", "1", *extra]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------- the model's own terms
def test_moe_sft_keeps_experts_balanced_and_updates_the_router_bias(tmp_path):
    """Both balancing mechanisms run in fine-tuning: the auxiliary loss is part of every step, and
    the router bias moves after every step. Measured: last-10-step max/mean load 1.08-1.37; without
    the balance loss this tiny random model routes every token to one expert (max/mean 2)."""
    moe = dict(ffn_kind="moe", n_experts=4, n_experts_per_tok=2, moe_ffn_hidden=32, router_bias_rate=1e-3, aux_loss_coef=0.1)
    model_dir = tiny_model_dir(tmp_path / "m", **moe)
    cfg = FinetuneConfig(max_steps=40, lr=1e-3, warmup_steps=2, eval_every=0, log_every=1, batch_size=16)
    finetune_sft(model_dir, write_json(tmp_path / "d.json", records(64)), tmp_path / "run", cfg=cfg, max_new_tokens=1,
                 max_responses=1, progress=False)
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    per_layer = [r["moe_max_mean"] for r in logged if "moe_max_mean" in r]
    assert len(per_layer) == 40 and all(len(v) == 2 for v in per_layer)  # every step, both MoE layers
    assert max(max(v) for v in per_layer[-10:]) <= 1.5, per_layer[-10:]
    assert all(r["moe_aux_loss"] > 0 for r in logged if "loss" in r)
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases)  # the auxiliary-loss-free update ran
    assert all(b.abs().max() <= 40 * 1e-3 + 1e-6 for b in biases)  # one rate-sized step per optimizer step at most


def test_mtp_model_sft_trains_its_mtp_modules(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m", mtp_depth=1)
    cfg = FinetuneConfig(max_steps=4, lr=3e-3, warmup_steps=1, eval_every=0, log_every=1)
    finetune_sft(model_dir, write_json(tmp_path / "d.json", records(16)), tmp_path / "run", cfg=cfg, max_new_tokens=2,
                 max_responses=1, progress=False)
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 4 and all(r["mtp_loss"] > 0 for r in logged)
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    mtp = [k for k in before if k.startswith("mtp.")]
    assert mtp and all(not torch.equal(before[k], after[k]) for k in mtp if k.endswith("eh_proj.weight"))


def test_model_losses_add_exactly_the_weighted_mtp_term(tmp_path):
    """The loop's extra term for an MTP model is mtp_loss_weight * the multi-token loss on the
    batch's targets, and nothing without next-token targets (classification)."""
    from slmkit.config import ModelConfig
    from slmkit.model.transformer import Transformer
    from slmkit.train.loop import model_losses
    from slmkit.train.objectives.lm import multi_token_loss

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layers=1, n_heads=2, mtp_depth=2,
                                    mtp_loss_weight=0.25)).train()
    x, y = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    y[:, :3] = -100  # a masked prompt
    output = model(x, targets=y)
    extra, logs = model_losses(model, output, y)
    expected = multi_token_loss(output.mtp_logits, y)
    torch.testing.assert_close(extra, 0.25 * expected)
    torch.testing.assert_close(logs["mtp_loss"], expected)
    assert model_losses(model, output, None) == (None, {})  # no next-token targets: no MTP term
    assert model_losses(model, None, y) == (None, {})


# ---------------------------------------------------------------------------- fp16
def test_fp16_finetuning_scales_the_loss_and_checkpoints_the_scaler(tmp_path, monkeypatch):
    """fp16 compute needs a GPU; on CPU the loop is given an fp16 Precision directly, so its
    GradScaler is enabled and runs every step (scale, unscale before clipping, step, update)."""
    import slmkit.train.loop as loop

    monkeypatch.setattr(loop, "resolve_precision", lambda name, device: Precision("fp16", device))
    scaled = []
    real_scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, outputs: scaled.append(self.get_scale()) or real_scale(self, outputs))
    model_dir = tiny_model_dir(tmp_path / "m", n_layers=1)
    cfg = FinetuneConfig(max_steps=3, lr=1e-3, warmup_steps=1, eval_every=0, log_every=1, save_every=1, batch_size=4)
    result = finetune_sft(model_dir, write_json(tmp_path / "d.json", records(8)), tmp_path / "run", cfg=cfg,
                          max_new_tokens=1, max_responses=1, progress=False)
    assert len(scaled) == 3 and scaled[0] == 65536.0  # GradScaler's initial scale, on every micro-step
    state = ckpt.load_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["scaler"]["scale"] == pytest.approx(65536.0) and "_growth_tracker" in state["scaler"]  # a disabled scaler saves {}
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run")))) and result.fit.steps == 3


# ---------------------------------------------------------------------------- DDP and resume
def equal_length_records(model_dir: Path) -> list[dict]:
    """Records whose responses have the same number of tokens, so that the mean of per-rank mean
    losses equals the global mean and one process and two agree to rounding."""
    template = ChatFormat.from_name("alpaca", Tokenizer.load(model_dir))
    candidates = records(64)
    lengths = [len(template.encode_record(r).response) for r in candidates]
    common = Counter(lengths).most_common(1)[0][0]
    return [r for r, n in zip(candidates, lengths) if n == common]


def test_two_process_ddp_sft_matches_one_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", equal_length_records(model_dir))
    steps = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "8"]
    single = cli(*sft_args(model_dir, data, tmp_path / "one", *steps))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "slmkit",
                          *sft_args(model_dir, data, tmp_path / "two", *steps)], capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert [r[0] for r in one] == [r[0] for r in two] and len(one) == 4 + 3  # 4 steps, validation at 0, 2, 4
    gaps = [abs(x - y) / abs(x) for a, b in zip(one, two) for x, y in zip(a[1:], b[1:]) if x is not None and x != 0]
    print(f"largest relative gap between one and two processes: {max(gaps):.2e}")
    for a, b in zip(one, two):  # sums in other orders, other pad widths
        assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-4)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


def test_sft_resume_after_sigkill_is_bit_identical(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", records(40))
    steps = ["--max-steps", "30", "--save-every", "3", "--eval-every", "5"]
    whole = cli(*sft_args(model_dir, data, tmp_path / "whole", *steps))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", *sft_args(model_dir, data, out, *steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any((out / "checkpoints").glob("step-*")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it was killed"
    resumed = cli(*sft_args(model_dir, data, out, "--resume"))  # the saved config supplies the rest
    assert resumed.returncode == 0, resumed.stderr

    assert curve(out) == curve(tmp_path / "whole")
    a, b = load_file(tmp_path / "whole" / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "responses.jsonl").read_text() == (tmp_path / "whole" / "responses.jsonl").read_text()
    assert len(list((out / "checkpoints").glob("step-*"))) == 3


def test_lora_sft_resume_continues_the_adapter(tmp_path, monkeypatch):
    """In-process: a LoRA run that dies after its step-3 checkpoint, continued with resume=True,
    equals the uninterrupted run (adapter weights, losses, validation, best-weights restore)."""
    from slmkit.train.loop import Loop

    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", records(24))
    cfg = FinetuneConfig(max_steps=6, lr=3e-3, warmup_steps=1, eval_every=2, log_every=1, save_every=3, lora_rank=2)
    finetune_sft(model_dir, data, tmp_path / "whole", cfg=cfg, max_new_tokens=1, progress=False)

    save = Loop.save_checkpoint

    def save_then_die(self):
        save(self)
        raise RuntimeError("killed")

    monkeypatch.setattr(Loop, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        finetune_sft(model_dir, data, tmp_path / "part", cfg=cfg, max_new_tokens=1, progress=False)
    monkeypatch.setattr(Loop, "save_checkpoint", save)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "part")] == ["step-3"]
    finetune_sft(model_dir, data, tmp_path / "part", cfg=cfg, resume=True, max_new_tokens=1, progress=False)
    assert curve(tmp_path / "part") == curve(tmp_path / "whole")
    adapter = Path("final") / "adapters" / "default" / "adapter.safetensors"
    a, b = load_file(tmp_path / "whole" / adapter), load_file(tmp_path / "part" / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- trackers, recipes, warmup
def test_finetune_logs_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", records(16))
    assert main(sft_args(model_dir, data, tmp_path / "run", "--max-steps", "3", "--eval-every", "0",
                         "--log-to", "tensorboard")) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert {"val_loss", "lr", "grad_norm"} <= set(events.Tags()["scalars"])


def test_finetune_recipe_file_and_its_errors(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", records(16))
    (tmp_path / "recipe.yaml").write_text("max_steps: 5\nbatch_size: 4\neval_every: 0\nlora_rank: 2\nlora_targets: q,v\n")
    argv = ["finetune", "sft", str(model_dir), "--data", str(data), "--max-new-tokens", "1", "-q"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--config", str(tmp_path / "recipe.yaml"), "--max-steps", "2"]) == 0
    saved = json.loads((tmp_path / "a" / "finetune_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["batch_size"] == 4 and saved["lora_targets"] == ["q", "v"]  # flags beat the recipe
    assert saved["lr"] == 1e-4  # the task's default learning rate when neither gives one
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps({"max_step": 5}))
    assert main([*argv, "--out", str(tmp_path / "b"), "--config", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'max_step' (did you mean 'max_steps'?)\n"
    assert main([*argv, "--out", str(tmp_path / "a"), "--max-steps", "2"]) == 2
    assert "already exists; pass --resume to continue it or --force to start over" in capsys.readouterr().err


def test_warmup_is_derived_from_the_run_length_unless_given(tmp_path, capsys):
    assert FinetuneConfig(max_steps=40).warmup == 4 and FinetuneConfig(max_steps=300).warmup == 10
    assert FinetuneConfig(max_steps=40, warmup_steps=0).warmup == 0 and FinetuneConfig(max_steps=3).warmup == 1
    assert TrainConfig(data="d", out="o", max_steps=40).warmup == 4 and TrainConfig(data="d", out="o").warmup == 100
    assert TrainConfig(data="d", out="o", max_steps=40, warmup_steps=30).warmup == 30

    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", records(16))
    for name, warmup in (("derived", None), ("given", 3)):
        cfg = FinetuneConfig(max_steps=20, lr=1e-3, warmup_steps=warmup, eval_every=0, log_every=1)
        finetune_sft(model_dir, data, tmp_path / name, cfg=cfg, max_new_tokens=1, progress=False)
        lrs = [r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "lr" in r]
        steps = 2 if warmup is None else warmup
        assert lrs[:steps] == pytest.approx([1e-3 * (i + 1) / steps for i in range(steps)])
        assert lrs[steps - 1] == pytest.approx(1e-3)
        out = capsys.readouterr().out
        said = "warmup: 2 steps, derived from the run's 20 steps, at most 10% of them; pass --warmup-steps N to choose"
        assert (said in out) == (warmup is None), out
        report = (tmp_path / name / "report.md").read_text()
        assert ("| warmup steps | 2 (derived from the run length) |" in report) == (warmup is None)
