"""Small training runs for tests: tiny data from real text, one call per run."""

from __future__ import annotations

import json
from pathlib import Path

from slmkit.data import prepare
from slmkit.tokenizer import train_bpe
from slmkit.train import TrainConfig, pretrain
from slmkit.train.run_metrics import read_metrics

SMALL = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, context_length=32)
# The `tiny` preset memorizes the ~9k tokens of the-verdict: loss 0.09 after 190 steps at lr 2e-3
# (batch 16, context 256). A short context cannot get there: the first positions of a random window
# have no context to tell where in the text they are (context 64 floors near 0.23).
OVERFIT_MODEL = {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "context_length": 256}  # = tiny
OVERFIT_STEPS = 300


def make_data(text: str, out: Path, vocab_size: int) -> Path:
    """Paragraphs as documents -> out/tokenizer and out/data (10% of paragraphs for validation)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tokenizer = train_bpe(paragraphs, vocab_size)
    tokenizer.save(out / "tokenizer")
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    prepare([out / "docs.jsonl"], tokenizer, out / "data", val_fraction=0.1, dedup="none",
            max_nonalnum_ratio=None, max_repeated_line_ratio=None, progress=False)
    return out / "data"


def run(data: Path, out: Path, **settings) -> list[dict]:
    """Train in-process; the metrics of every step."""
    model = {} if "init" in settings else {**SMALL, **settings.pop("model", {})}
    defaults = dict(max_steps=10, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, log_every=1, peak_flops=1e11)
    pretrain(TrainConfig(data=str(data), out=str(out), model=model, **{**defaults, **settings}), force=True, progress=False)
    return read_metrics(out / "metrics.jsonl")


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def train_on_a_cycle(model, steps: int = 60, lr: float = 1e-2):
    """Fit a model with MTP modules to the repeating sequence 0..6 (main and MTP losses), so that its
    drafts are nearly always right; returns it in eval mode."""
    import torch

    from slmkit.train.loop import model_losses
    from slmkit.train.objectives.lm import next_token_loss

    model.train()
    pattern = torch.arange(7).repeat(7)[None, :48]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        output = model(pattern[:, :-1], targets=pattern[:, 1:])
        loss = next_token_loss(output.logits, pattern[:, 1:])
        (loss + model_losses(model, output, pattern[:, 1:])[0]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
