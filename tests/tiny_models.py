"""Small model directories for export tests: a few seconds of training on a short text makes
the next-token distribution peaked, so greedy parity across runtimes is a meaningful check."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from slmkit.config import ModelConfig
from slmkit.model import Transformer
from slmkit.model.io import save_model_dir
from slmkit.tokenizer import Tokenizer, train_bpe

TEXT = (
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun while the fox runs home.\n"
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "User: hello there\nAssistant: hi, how can I help?\n"
    "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!\n"
)


def tokenizer(vocab_size: int = 320, pattern: str = "gpt4") -> Tokenizer:
    return train_bpe([TEXT * 4], vocab_size, pattern=pattern)


def train(model: Transformer, ids: list[int], steps: int, seq: int = 32, batch: int = 8) -> Transformer:
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq] for s in starts])
        y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def model_dir(path: Path, steps: int = 60, pattern: str = "gpt4", **overrides) -> Path:
    """A trained tiny model directory (llama-style by default; overrides change the config)."""
    tok = tokenizer(pattern=pattern)
    torch.manual_seed(0)
    defaults = {"vocab_size": tok.vocab_size, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "context_length": 128}
    cfg = ModelConfig(**{**defaults, **overrides})
    model = Transformer(cfg)
    if steps:
        train(model, tok.encode_ordinary(TEXT * 8), steps)
    return save_model_dir(model, path, tok, {"temperature": 0.0})
