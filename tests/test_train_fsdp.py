"""FSDP2 training and sharded (DCP) checkpoints on CPU with gloo, through torchrun: one process
and two agree, checkpoints resume on another number of processes, consolidation gives the live
model's weights, a two-node launch on one machine, LoRA + MoE fine-tuning, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from collections import Counter

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file
from specialize_fixtures import TEXTS, tiny_model_dir, write_json
from train_helpers import SMALL

import slmkit
from slmkit.chat import ChatFormat
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.finetune import FinetuneConfig, finetune_classify, finetune_distill, finetune_dpo, finetune_sft
from slmkit.model.io import save_model_dir
from slmkit.model.transformer import Transformer
from slmkit.train import TrainConfig, pretrain
from slmkit.train import checkpoint as ckpt
from slmkit.train.run_metrics import read_metrics
from slmkit.tokenizer import Tokenizer
from slmkit.train.sharded import ShardedSaver, consolidate

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# One process and two sum the same float32 numbers in other orders (two half-batch gradients
# reduce-scattered vs one whole-batch gradient): measured gaps are below 3e-7 relative.
REL = 1e-5
STEPS = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--eval-batches", "2"]


def pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={k}={v}" for k, v in {**SMALL, "n_layers": 2}.items()]
    return ["pretrain", "-q", "--data", str(data), "--out", str(out), *sets, "--batch-size", "8", "--lr", "3e-3",
            "--warmup-steps", "2", "--log-every", "1", "--peak-flops", "1e11", *extra]


def torchrun(*args: str, nproc: int = 2, launcher: tuple[str, ...] = ("--standalone",)) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "torchrun"), *launcher, f"--nproc-per-node={nproc}", "-m", "slmkit", *args],
                          capture_output=True, text=True, env=ENV, timeout=240)


def curve(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]


def assert_same_curve(a: list[tuple], b: list[tuple], rel: float) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b):
        assert [v for v in x if v is not None] == pytest.approx([v for v in y if v is not None], rel=rel)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def keep_only(run: Path, step: int) -> None:
    """Cut a finished run back to its step-N checkpoint, as if it had died right after saving it."""
    shutil.rmtree(run / "final")
    for d in ckpt.complete_checkpoints(run):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)


@pytest.fixture(scope="session")
def fsdp_run(verdict, tmp_path_factory, worker_id) -> Path:
    """Two processes, --strategy fsdp, 6 steps, sharded checkpoints at steps 2, 4 and 6: run once
    per session, also when pytest-xdist spreads the tests using it over several workers."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    run = root / "fsdp-run"
    with FileLock(str(root / "fsdp-run.lock")):
        if not (run / "final").is_dir():
            shutil.rmtree(run, ignore_errors=True)
            done = torchrun(*pretrain_args(verdict, run, "--strategy", "fsdp", *STEPS))
            assert done.returncode == 0, done.stderr[-3000:]
    return run


# ---------------------------------------------------------------------------- one process and two agree
def test_two_process_fsdp_matches_one_process(verdict, fsdp_run, tmp_path):
    assert main(pretrain_args(verdict, tmp_path / "one", *STEPS)) == 0  # one plain process (ddp without peers)
    assert_same_curve(curve(fsdp_run), curve(tmp_path / "one"), REL)
    a, b = weights(fsdp_run / "final"), weights(tmp_path / "one" / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    report = (fsdp_run / "report.md").read_text()
    assert "| processes | 2 |" in report and "| strategy | fsdp |" in report


# ---------------------------------------------------------------------------- sharded checkpoints
def test_sharded_checkpoint_layout(fsdp_run):
    steps = ckpt.complete_checkpoints(fsdp_run)
    assert [d.name for d in steps] == ["step-2", "step-4", "step-6"]
    for d in steps:
        assert ckpt.is_sharded(d) and not (d / "model.safetensors").exists()  # weights live in the shards only
        assert sorted(p.name for p in (d / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert json.loads((d / "trainer_state" / "meta.json").read_text())["processes"] == 2
    initial = fsdp_run / "checkpoints" / "initial"
    assert (initial / "config.json").is_file() and (initial / "tokenizer.json").is_file()
    assert not list((fsdp_run / "checkpoints").glob(".*"))  # no temporaries left


def test_consolidation_gives_the_live_models_weights_and_logits(fsdp_run, tmp_path):
    """final/ is the live model at step 6 (its shards gathered); consolidating step-6 gives it back."""
    assert main(["checkpoint", "consolidate", str(fsdp_run / "checkpoints" / "step-6"), "--out", str(tmp_path / "six")]) == 0
    live, merged = weights(fsdp_run / "final"), weights(tmp_path / "six")
    assert live.keys() == merged.keys() and all(torch.equal(live[k], merged[k]) for k in live)
    model, tokenizer = slmkit.load(tmp_path / "six")
    reference, _ = slmkit.load(fsdp_run / "final")
    ids = torch.tensor([tokenizer.encode("It had always been his fate to have women say such things of him.")[:32]])
    assert torch.equal(model(ids), reference(ids))
    early = consolidate(fsdp_run / "checkpoints" / "step-2", tmp_path / "two")
    assert not torch.equal(weights(early)["embed_tokens.weight"], live["embed_tokens.weight"])  # a checkpoint of its own step
    for name in ("config.json", "tokenizer.json", "generation.json"):
        assert (tmp_path / "six" / name).read_text() == (fsdp_run / "final" / name).read_text()


def test_resume_across_world_sizes(fsdp_run, tmp_path):
    """2 -> 1 -> 2 processes: the same steps, data and schedule, and losses equal to the
    uninterrupted two-process run up to the summation order (REL); a checkpoint resumed on one
    process holds exactly the weights two processes saved."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_run, run)
    keep_only(run, 2)
    assert main(["pretrain", "-q", "--out", str(run), "--resume"]) == 0  # one process; the saved config supplies the rest
    assert json.loads((run / "checkpoints" / "step-4" / "trainer_state" / "meta.json").read_text())["processes"] == 1
    keep_only(run, 4)
    resumed = torchrun("pretrain", "-q", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_curve(curve(run), curve(fsdp_run), REL)
    a, b = weights(run / "final"), weights(fsdp_run / "final")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)

    exact = tmp_path / "exact"
    shutil.copytree(fsdp_run, exact)
    keep_only(exact, 6)  # nothing left to train: final/ is what one process loaded from two's shards
    assert main(["pretrain", "-q", "--out", str(exact), "--resume"]) == 0
    a, b = weights(exact / "final"), weights(fsdp_run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_during_a_sharded_save_leaves_the_previous_checkpoint_latest(verdict, tmp_path, monkeypatch):
    """In one process: the step-4 save dies after its shards are written and before it is
    renamed into place; step-2 stays the latest, and resuming from it is bit for bit the
    uninterrupted run."""
    cfg = TrainConfig(data=str(verdict), out=str(tmp_path / "whole"), model={**SMALL, "n_layers": 2}, strategy="fsdp",
                      max_steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, save_every=2,
                      log_every=1, peak_flops=1e11)
    pretrain(cfg, progress=False)
    wait = ShardedSaver.wait

    def die_before_renaming_step_4(self):
        if self.pending is not None and self.pending[2] == 4:
            self.pending[0].result()
            raise RuntimeError("killed")
        wait(self)

    monkeypatch.setattr(ShardedSaver, "wait", die_before_renaming_step_4)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(TrainConfig(**{**cfg.to_dict(), "out": str(crashed)}), progress=False)
    monkeypatch.setattr(ShardedSaver, "wait", wait)
    torch.distributed.destroy_process_group()  # the group a crashed one-process run leaves behind
    assert [d.name for d in ckpt.complete_checkpoints(crashed)] == ["step-2"]
    assert (crashed / "checkpoints" / ".step-4.sharded.tmp" / "shards" / ".metadata").is_file()
    pretrain(TrainConfig(**{**cfg.to_dict(), "out": str(crashed)}), resume=True, progress=False)
    assert not list((crashed / "checkpoints").glob(".*"))
    assert curve(crashed) == curve(tmp_path / "whole")
    a, b = weights(crashed / "final"), weights(tmp_path / "whole" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_and_bf16_under_fsdp(verdict, tmp_path):
    """Recomputing each block in backward changes nothing; bf16 (gathered weights bf16,
    gradients reduced in fp32) trains to within bf16's rounding of fp32."""
    base = dict(data=str(verdict), model={**SMALL, "n_layers": 2}, strategy="fsdp", max_steps=4, batch_size=8, lr=3e-3,
                warmup_steps=1, eval_every=0, save_every=0, log_every=1, peak_flops=1e11)
    pretrain(TrainConfig(out=str(tmp_path / "plain"), **base), progress=False)
    pretrain(TrainConfig(out=str(tmp_path / "ac"), activation_checkpointing=True, **base), progress=False)
    pretrain(TrainConfig(out=str(tmp_path / "bf16"), precision="bf16", **base), progress=False)
    assert curve(tmp_path / "ac") == curve(tmp_path / "plain")
    fp32, bf16 = [r[1] for r in curve(tmp_path / "plain")], [r[1] for r in curve(tmp_path / "bf16")]
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


# ---------------------------------------------------------------------------- multi-node recipe
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine(verdict, fsdp_run, tmp_path):
    """The multi-node recipe: one torchrun per node, the same --master-addr/--master-port
    rendezvous; here both "nodes" are this machine. Two nodes of one process each are the same
    two ranks as one node of two: the same losses, bit for bit."""
    port = _free_port()
    args = pretrain_args(verdict, tmp_path / "run", "--strategy", "fsdp", *STEPS)
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "slmkit", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert curve(tmp_path / "run") == curve(fsdp_run)
    assert "| processes | 2 |" in (tmp_path / "run" / "report.md").read_text()


# ---------------------------------------------------------------------------- fine-tuning: LoRA on an MoE model
def sft_records(n: int = 32) -> list[dict]:
    words = ["win", "prize", "cash", "lunch", "home", "love", "tips", "sleep"]
    return [{"instruction": f"Say the word {words[i % 8]}.", "input": "", "output": words[(i * 3) % 8]} for i in range(n)]


def equal_length_records(model_dir: Path) -> list[dict]:
    """Records whose responses have one token count, so that the mean of per-rank mean losses is
    the global mean."""
    template = ChatFormat.from_name("alpaca", Tokenizer.load(model_dir))
    candidates = sft_records(64)
    lengths = [len(template.encode_record(r).response) for r in candidates]
    common = Counter(lengths).most_common(1)[0][0]
    return [r for r, n in zip(candidates, lengths) if n == common]


def test_lora_sft_of_an_moe_model_two_processes_match_one(tmp_path):
    """Every finetune task takes --strategy fsdp; here LoRA SFT of an MoE model, whose router bias
    moves from the expert load of both ranks. Records of one response length make the mean of
    per-rank mean losses the global mean."""
    moe = dict(ffn_kind="moe", n_experts=4, n_experts_per_tok=2, moe_ffn_hidden=32, router_bias_rate=1e-3, aux_loss_coef=0.1)
    model_dir = tiny_model_dir(tmp_path / "m", **moe)
    data = write_json(tmp_path / "d.json", equal_length_records(model_dir))
    args = ["finetune", "sft", str(model_dir), "--data", str(data), "-q", "--lr", "3e-3", "--warmup-steps", "1",
            "--log-every", "1", "--max-new-tokens", "2", "--max-responses", "1", "--max-steps", "4", "--eval-every", "2",
            "--save-every", "2", "--lora-rank", "2", "--lora-targets", "q,v,up"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = torchrun(*args, "--out", str(tmp_path / "two"), "--strategy", "fsdp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"), REL)
    adapter = Path("final") / "adapters" / "default" / "adapter.safetensors"
    a, b = load_file(tmp_path / "two" / adapter), load_file(tmp_path / "one" / adapter)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    best = next(line for line in (tmp_path / "two" / "report.md").read_text().splitlines() if line.startswith("| best step |"))
    merged = consolidate(tmp_path / "two" / "checkpoints" / f"step-{best.split('|')[2].strip()}", tmp_path / "merged")
    c = load_file(merged / "adapters" / "default" / "adapter.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)  # final/ holds the best evaluation's weights


def run_task(task: str, tmp: Path, strategy: str, verdict: Path) -> Path:
    """A 3-step run of a fine-tuning task in this process, checkpointing every step."""
    out = tmp / strategy
    lora = 2 if task.endswith("lora") else 0
    cfg = FinetuneConfig(max_steps=3, lr=3e-3, warmup_steps=1, eval_every=1, save_every=1, log_every=1, batch_size=4,
                         lora_rank=lora, strategy=strategy)
    if task.startswith("classify"):
        rows = [{"text": t, "label": "spam" if "win" in t or "prize" in t else "ham"} for t in TEXTS]
        data = write_json(tmp / "c.json", rows)
        finetune_classify(tiny_model_dir(tmp / "m"), data, out, cfg=cfg, val_fraction=0.25, progress=False)
    elif task == "dpo-lora":
        rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"} for w in ["win", "cash", "home", "love", "tips", "sleep"] * 2]
        finetune_dpo(tiny_model_dir(tmp / "m"), write_json(tmp / "p.json", rows), out, cfg=cfg, progress=False)
    elif task == "distill":
        teacher = tmp / "teacher"
        if not teacher.exists():
            torch.manual_seed(1)
            save_model_dir(Transformer(ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": 512})), teacher,
                           Tokenizer.load(verdict.parent / "tokenizer"))
        finetune_distill(teacher, verdict, out, student_preset="tiny", student_overrides={**SMALL, "n_layers": 2},
                         eval_windows=8, cfg=cfg, progress=False)
    else:  # sft of a model with multi-token prediction: its MTP block is sharded as a block too
        finetune_sft(tiny_model_dir(tmp / "m", mtp_depth=1), write_json(tmp / "d.json", sft_records(16)), out, cfg=cfg,
                     max_new_tokens=1, max_responses=1, progress=False)
    return out


def tensors_under(directory: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(directory)}:{k}": v for f in sorted(directory.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("task", ["classify", "classify-lora", "dpo-lora", "distill", "sft-mtp"])
def test_every_finetune_task_under_fsdp_in_one_process_is_plain_training(task, verdict, tmp_path):
    """FSDP over one process shards nothing, so it must train bit for bit as the plain loop does;
    and consolidating the best step gives final/ (which holds the best evaluation's weights)."""
    ddp, fsdp = run_task(task, tmp_path, "ddp", verdict), run_task(task, tmp_path, "fsdp", verdict)
    assert curve(fsdp) == curve(ddp)
    final = tensors_under(fsdp / "final")
    assert final.keys() == tensors_under(ddp / "final").keys()
    assert all(torch.equal(v, tensors_under(ddp / "final")[k]) for k, v in final.items())
    best = next(line for line in (fsdp / "report.md").read_text().splitlines() if line.startswith("| best step |"))
    merged = tensors_under(consolidate(fsdp / "checkpoints" / f"step-{best.split('|')[2].strip()}", tmp_path / "merged"))
    assert merged.keys() == final.keys() and all(torch.equal(merged[k], final[k]) for k in final)


# ---------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err


def test_a_world_size_that_does_not_divide_the_batch(verdict, tmp_path):
    run = tmp_path / "run"
    done = torchrun(*pretrain_args(verdict, run, "--strategy", "fsdp", "--batch-size", "7", "--max-steps", "1"))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(e == errors[0] for e in errors), done.stderr[-3000:]
    assert "batch_size 7 must be divisible by the number of processes 2" in errors[0] and "--batch-size 8" in errors[0]
    assert "exitcode  : 2" in done.stderr  # each rank exited as the CLI does on bad input
    assert not run.exists()  # refused before anything was written


def test_strategy_settings_that_cannot_work_are_one_line_errors(verdict, tmp_path, capsys):
    base = pretrain_args(verdict, tmp_path / "run", "--max-steps", "1")
    _one_line_error(capsys, [*base, "--strategy", "fsdp", "--cpu-offload"], "on cpu there is nothing to offload")
    _one_line_error(capsys, [*base, "--cpu-offload"], "use it with --strategy fsdp")
    (tmp_path / "recipe.json").write_text(json.dumps({"strategy": "zero3"}))
    _one_line_error(capsys, [*base, "--recipe", str(tmp_path / "recipe.json")], "strategy must be one of ddp, fsdp, not 'zero3'")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_another_model_is_a_one_line_error(fsdp_run, tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", sft_records(16))
    cfg = FinetuneConfig(max_steps=2, lr=3e-3, warmup_steps=1, eval_every=0, save_every=1, lora_rank=2, strategy="fsdp")
    finetune_sft(model_dir, data, tmp_path / "run", cfg=cfg, max_new_tokens=1, max_responses=1, progress=False)
    args = ["finetune", "sft", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), "-q", "--resume",
            "--max-steps", "4"]
    _one_line_error(capsys, [*args, "--lora-rank", "4"],
                    "is of another model (layers.0.self_attn.k_proj.lora_A.default.weight is [2, 32] there, [4, 32] here)")
    _one_line_error(capsys, [*args, "--strategy", "ddp", "--lora-targets", "q,k"],
                    "it has layers.0.self_attn.o_proj.lora_A.default.weight, which this model lacks")
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["lora_rank"] == 2  # refused before anything was written

    def consolidate_error(checkpoint: Path, match: str, out: Path = tmp_path / "x") -> None:
        _one_line_error(capsys, ["checkpoint", "consolidate", str(checkpoint), "--out", str(out)], match)
        assert not (tmp_path / "x").exists()

    other = tmp_path / "other" / "checkpoints"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "initial", other / "initial")
    shutil.copytree(fsdp_run / "checkpoints" / "step-2", other / "step-2")  # beside another run's model files
    consolidate_error(other / "step-2", "is of another model")
    consolidate_error(tmp_path / "nowhere", "is not a complete checkpoint")
    plain = FinetuneConfig(max_steps=1, lr=3e-3, warmup_steps=0, eval_every=0)
    finetune_sft(model_dir, data, tmp_path / "ddp", cfg=plain, max_new_tokens=1, max_responses=1, progress=False)
    consolidate_error(tmp_path / "ddp" / "checkpoints" / "step-1", "is not sharded: it was saved with --strategy ddp")
    consolidate_error(fsdp_run / "checkpoints" / "step-2", "already exists", out=fsdp_run / "final")
    (other / "step-2" / "shards" / "__1_0.distcp").write_bytes(b"\0" * 100)
    shutil.rmtree(other / "initial")
    shutil.copytree(fsdp_run / "checkpoints" / "initial", other / "initial")
    consolidate_error(other / "step-2", "corrupt or truncated")


# ---------------------------------------------------------------------------- GPUs (skipped without CUDA)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL between them)")


@needs_cuda
@pytest.mark.parametrize("precision,offload", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_fsdp_on_a_gpu(verdict, tmp_path, precision, offload):
    """bf16 (bf16 gathers, fp32 reduce-scatter), fp16 with the loss scaler that checks every shard,
    and parameter shards offloaded to the CPU: each learns as fp32 does, and consolidating the
    last checkpoint gives final/."""
    base = dict(data=str(verdict), model={**SMALL, "n_layers": 2}, max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2,
                eval_every=0, save_every=10, log_every=1, peak_flops=1e14)
    pretrain(TrainConfig(out=str(tmp_path / "fp32"), precision="fp32", **base), progress=False)
    pretrain(TrainConfig(out=str(tmp_path / "run"), precision=precision, strategy="fsdp", cpu_offload=offload, **base),
             progress=False)
    fp32, trained = [r[1] for r in curve(tmp_path / "fp32") if r[1]], [r[1] for r in curve(tmp_path / "run") if r[1]]
    assert trained[-1] < trained[0] - 0.5 and trained[-1] == pytest.approx(fp32[-1], rel=0.05), trained
    merged = weights(consolidate(tmp_path / "run" / "checkpoints" / "step-20", tmp_path / "merged"))
    final = weights(tmp_path / "run" / "final")
    assert all(torch.equal(merged[k], final[k]) for k in final)


@needs_two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_over_nccl_match_one(verdict, tmp_path, strategy):
    """fp32 on two GPUs (NCCL) against one: the same curve up to summation order and GPU kernels."""
    steps = ["--max-steps", "6", "--eval-every", "3", "--eval-batches", "2", "--save-every", "3", "--precision", "fp32"]
    assert main(pretrain_args(verdict, tmp_path / "one", *steps)) == 0
    two = torchrun(*pretrain_args(verdict, tmp_path / "two", "--strategy", strategy, *steps))
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"), 1e-4)
