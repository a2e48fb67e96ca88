"""Specialization benchmark: SMS spam classification, full fine-tuning against LoRA, same run.

1. Split the SMS Spam Collection with a fixed seed: 20% test (`split_records(..., 0.2, seed=0)`),
   then 10% of the rest for validation (seed 1) — the split `finetune_classify(test_fraction=0.2)`
   makes with seed 0.
2. Train a byte-level BPE tokenizer (vocab 2048) and pretrain a `tiny` model (context 128) from
   scratch on the *training* messages only, for `--pretrain-minutes`.
3. Fine-tune it for classification twice, each in its own process (so peak memory is its own):
   all weights, and LoRA (rank 8 on q,k,v,o, plus the new head). Report trainable parameters,
   peak memory (RSS), median step time and test accuracy / macro-F1.

Runs on one CPU thread unless OMP_NUM_THREADS says otherwise.

    .venv/bin/python bench/bench_specialize.py --out /tmp/bench-specialize
    .venv/bin/python bench/bench_specialize.py --quick        # smoke run (no accuracy claims)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# One thread: on a shared 2-core machine a second OpenMP thread slows small models 5-20x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms-spam-collection" / "SMSSpamCollection"
VARIANTS = {
    "full": {"lr": 3e-4},
    "lora": {"lr": 2e-3, "lora_rank": 8, "lora_alpha": 16.0},
}


def pretrain_base(out: Path, minutes: float, steps: int) -> Path:
    from slmkit import train_bpe
    from slmkit.data import prepare
    from slmkit.data.records import read_records, split_records
    from slmkit.train import TrainConfig, pretrain

    records = read_records(SMS, ("0", "1"), fmt="tsv").items
    rest, _test = split_records(records, 0.2, seed=0)  # the test split never reaches pretraining
    corpus = out / "sms-train.txt"
    corpus.write_text("\n\n".join(r["1"] for r in rest) + "\n", encoding="utf-8")
    tokenizer = train_bpe([corpus], 2048)
    tokenizer.save(out / "tokenizer")
    prepare([corpus], tokenizer, out / "shards", val_fraction=0.05, dedup="none", min_chars=1, progress=False)
    cfg = TrainConfig(data=str(out / "shards"), out=str(out / "pretrain"), preset="tiny", tokenizer=str(out / "tokenizer"),
                      model={"vocab_size": tokenizer.vocab_size, "context_length": 128}, max_steps=steps,
                      max_minutes=minutes, batch_size=16, lr=1e-3, warmup_steps=50, eval_every=0, save_every=0)
    result = pretrain(cfg, progress=False)
    print(f"pretrained: {result.steps} steps, train loss {result.train_loss:.3f}", file=sys.stderr)
    return out / "pretrain" / "final"


def run_variant(base: Path, out: Path, variant: str, steps: int) -> dict:
    from slmkit.finetune import finetune_classify
    from slmkit.finetune import FinetuneConfig

    cfg = FinetuneConfig(max_steps=steps, batch_size=16, warmup_steps=20, eval_every=50, patience=4, **VARIANTS[variant])
    start = time.perf_counter()
    result = finetune_classify(base, SMS, out / variant, text_field="1", label_field="0", fmt="tsv", test_fraction=0.2,
                               max_length=128, cfg=cfg, force=True, progress=False)
    return {
        "variant": variant,
        "trainable": result.fit.trainable,
        "total": result.fit.total,
        "trainable_fraction": result.trainable_fraction,
        "peak_memory_mb": result.fit.peak_memory_mb,
        "step_seconds": result.fit.step_seconds,
        "steps": result.fit.steps,
        "best_step": result.fit.best_step,
        "test_accuracy": result.metrics["accuracy"],
        "test_macro_f1": result.metrics["macro_f1"],
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-specialize"))
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps per variant")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.base, args.out, args.variant, args.steps)))
        return
    if args.quick:
        args.pretrain_minutes, args.pretrain_steps, args.steps = 0.2, 20, 20
    args.out.mkdir(parents=True, exist_ok=True)
    base = pretrain_base(args.out, args.pretrain_minutes, args.pretrain_steps)
    rows = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--base", str(base), "--out", str(args.out),
                                "--steps", str(args.steps)], check=True, capture_output=True, text=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("| variant | trainable params | share | peak RSS (MB) | step time (ms) | steps (best) | test accuracy | test macro-F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['trainable']:,} | {r['trainable_fraction']:.2%} | {r['peak_memory_mb']:.0f} | "
              f"{1000 * r['step_seconds']:.1f} | {r['steps']} ({r['best_step']}) | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} |")


if __name__ == "__main__":
    main()
