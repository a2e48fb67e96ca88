"""Training-loop benchmark: what slmkit's step loop costs on top of a bare PyTorch loop.

  pretrain  `slmkit.train.pretrain` on token shards (the `tiny` preset, batch 8 x 256, fp32, no
            evaluation or checkpoints inside the timed steps) against a bare loop over the same
            model, batches, AdamW and clipping: forward, cross-entropy, backward, clip, step.
            Reported: median step time of each and the ratio (bare / slmkit; 1.0 = no overhead).
  sft       `slmkit.finetune.finetune_sft` on the shared instruction data (alpaca template, batch 8,
            full fine-tuning of the pretrained model): median optimizer-step time.

Runs alternate (slmkit, bare, slmkit, ...) for --repeats rounds; medians reported. Only public
APIs are used, so the same script times any slmkit checkout (PYTHONPATH=that/src).

    .venv/bin/python bench/bench_train_loop.py --data runs/quickstart/data --model runs/quickstart/run/final
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.data import RandomWindowSampler
from slmkit.finetune import FinetuneConfig, finetune_sft
from slmkit.model import Transformer
from slmkit.config import ModelConfig
from slmkit.train import TrainConfig, pretrain

SFT_DATA = Path(__file__).resolve().parents[1] / "../shared/data/llms-from-scratch-instruction/instruction-data.json"


def slmkit_pretrain_step(data: str, steps: int, batch: int) -> float:
    """Median seconds per optimizer step of `pretrain`, from its own per-step tokens/s log."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=data, out=f"{out}/run", preset="tiny", max_steps=steps, batch_size=batch,
                          warmup_steps=1, eval_every=0, save_every=0, log_every=1, seed=0, peak_flops=1e11)
        pretrain(cfg, progress=False)
        records = [json.loads(line) for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()]
        tok_s = [r["tok_s"] for r in records if "tok_s" in r][2:]  # the first steps warm up
        return statistics.median(batch * 256 / t for t in tok_s)


def bare_pretrain_step(data: str, steps: int, batch: int) -> float:
    """The same step without the loop around it: forward, loss, backward, clip, AdamW."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=_vocab_size(data))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    sampler = RandomWindowSampler(data, 256, "train", 0)
    times = []
    for _ in range(steps):
        x, y = sampler.get_batch(batch)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def sft_step(model_dir: str, steps: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = FinetuneConfig(max_steps=steps, batch_size=batch, lr=1e-4, eval_every=0, log_every=1, seed=0)
        result = finetune_sft(model_dir, SFT_DATA, f"{out}/sft", template="alpaca", max_responses=1,
                              max_new_tokens=4, cfg=cfg, progress=False)
        return result.fit.step_seconds


def _vocab_size(data: str) -> int:
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    return manifest["tokenizer"]["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/quickstart/data", help="token shards (default: the quickstart's)")
    parser.add_argument("--model", default="runs/quickstart/run/final", help="model directory fine-tuned by the SFT run")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run (default: 12)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    runs: dict[str, list[float]] = {"slmkit pretrain": [], "bare pretrain": [], "slmkit sft": []}
    for r in range(args.repeats):
        runs["slmkit pretrain"].append(slmkit_pretrain_step(args.data, args.steps, args.batch))
        runs["bare pretrain"].append(bare_pretrain_step(args.data, args.steps, args.batch))
        runs["slmkit sft"].append(sft_step(args.model, args.steps, args.batch))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in runs.items()), file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "step_ms": {k: round(v * 1e3, 1) for k, v in medians.items()},
        "pretrain bare / slmkit": round(medians["bare pretrain"] / medians["slmkit pretrain"], 3),
        "load_average": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "runs_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
