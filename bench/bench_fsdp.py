"""FSDP vs DDP on 2 CPU processes (gloo): optimizer-step time and peak memory per rank.

`slmkit pretrain` of one model under `torchrun --standalone --nproc-per-node 2` with `--strategy
ddp` and `--strategy fsdp`, each with and without activation checkpointing, alternating for
--repeats rounds; the same seed, data and batch (8 windows of 128 tokens over both ranks, fp32, no
evaluation, one checkpoint at the end). Activations take as much memory as the model's state at
this size, and both strategies hold the same activations: checkpointing them shows what sharding
the state saves. Reported per setting (medians over rounds):

  step       median seconds per optimizer step (rank 0's per-step log; the first 2 steps warm up)
  peak RSS   the larger of the two ranks' peak resident set over the training steps (read as the
             final checkpoint starts), and that peak minus the rank's resident set just before
             `pretrain` was called (torch, the process itself): what training added

Both run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc
raises it to the size of each large block freed, after which FSDP's gathered blocks (allocated
and freed once per block per step) come from the heap and are not returned, so the resident set
grows far past what is alive (measured: FSDP's peak 917 MB default, 615 MB fixed, DDP's 1010 and
978 MB; `--mmap-threshold 0` keeps glibc's default). Each rank runs this same script in --worker
mode and writes its numbers to RUN/rank-N.json.

    .venv/bin/python bench/bench_fsdp.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"
MODEL = {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "context_length": 128}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    from slmkit.train import Loop, TrainConfig, pretrain

    before, peak = rss_mb(), []
    save = Loop.save_checkpoint

    def note_peak_then_save(self):  # the run's one checkpoint comes after the last step: the peak so far is training's
        peak.append(rss_mb())
        save(self)

    Loop.save_checkpoint = note_peak_then_save
    cfg = TrainConfig(data=args.data, out=args.out, model=MODEL, strategy=args.strategy, max_steps=args.steps,
                      activation_checkpointing=args.activation_checkpointing,
                      batch_size=8, lr=3e-4, warmup_steps=2, eval_every=0, save_every=0, log_every=1, seed=0, peak_flops=1e11)
    pretrain(cfg, progress=False)
    rank = int(os.environ["RANK"])
    (Path(args.out) / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "before_mb": before, "peak_mb": peak[0]}))


def prepare_data(root: Path) -> Path:
    from slmkit.data import prepare
    from slmkit.tokenizer import train_bpe

    text = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:300_000]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(0, len(text), 10_000):
        (corpus / f"{i:07d}.txt").write_text(text[i : i + 10_000], encoding="utf-8")
    tokenizer = train_bpe([corpus], 512)
    prepare([corpus], tokenizer, root / "data", val_fraction=0.05, dedup="none", min_chars=1, progress=False)
    return root / "data"


def launch(setting: str, data: Path, out: Path, steps: int, args_mmap_threshold: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args_mmap_threshold)
    strategy, *ac = setting.split("+")
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", __file__,
                           "--worker", "--strategy", strategy, "--data", str(data), "--out", str(out), "--steps", str(steps),
                           *(["--activation-checkpointing"] if ac else [])],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    ranks = [json.loads(f.read_text()) for f in out.glob("rank-*.json")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = 8 * MODEL["context_length"]
    step = statistics.median(tokens / r["tok_s"] for r in records if "tok_s" in r and r["step"] > 2)
    return {"step_s": step, "peak_mb": max(r["peak_mb"] for r in ranks),
            "added_mb": max(r["peak_mb"] - r["before_mb"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mmap-threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ of both (0: glibc's default)")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch

    from slmkit.config import ModelConfig
    from slmkit.model import Transformer

    params = Transformer(ModelConfig.from_preset("tiny", vocab_size=512, **MODEL)).num_parameters()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(Path(tmp))
        runs: dict[str, list[dict]] = {"ddp": [], "fsdp": [], "ddp+ac": [], "fsdp+ac": []}
        for r in range(args.repeats):
            for setting in runs:
                runs[setting].append(launch(setting, data, Path(tmp) / f"{setting}-{r}", args.steps, args.mmap_threshold))
                print(setting, runs[setting][-1], file=sys.stderr)
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in runs.items()}
    print(f"model: {params / 1e6:.1f}M parameters ({MODEL}), fp32, batch 8 x {MODEL['context_length']}, "
          f"2 processes x 1 thread, torch {torch.__version__}, {args.repeats} rounds of {args.steps} steps, "
          f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'default'}")
    print("| strategy | activation checkpointing | step (s) | peak RSS per rank (MB) | added by training (MB) |")
    print("|---|---|---|---|---|")
    for ac in ("", "+ac"):
        for s in ("ddp", "fsdp"):
            m = med[s + ac]
            print(f"| {s} | {'yes' if ac else 'no'} | {m['step_s']:.2f} | {m['peak_mb']:.0f} | {m['added_mb']:.0f} |")
        f, d = med["fsdp" + ac], med["ddp" + ac]
        print(f"| fsdp / ddp | {'yes' if ac else 'no'} | {f['step_s'] / d['step_s']:.2f} | {f['peak_mb'] / d['peak_mb']:.2f} "
              f"| {f['added_mb'] / d['added_mb']:.2f} |")


if __name__ == "__main__":
    main()
