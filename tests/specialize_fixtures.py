"""Tiny models and data for the specialization tests (built on the fly, nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slmkit import train_bpe
from slmkit.config import ModelConfig
from slmkit.model.io import save_model_dir
from slmkit.model.transformer import Transformer

TEXTS = [
    "win a free prize now, call to claim your cash reward",
    "are we still meeting for lunch tomorrow?",
    "urgent: your account has won a holiday, text WIN to 80808",
    "ok see you at home later, love you",
    "Give three tips for staying healthy. Eat well, sleep, exercise.",
    "Translate the sentence into French. Bonjour le monde.",
] * 4


def tiny_model_dir(path: Path, texts: list[str] = TEXTS, vocab_size: int = 320, seed: int = 0, **overrides) -> Path:
    """A random tiny Llama-style model + a BPE tokenizer trained on `texts`, saved at `path`."""
    tokenizer = train_bpe(texts, vocab_size)
    torch.manual_seed(seed)
    cfg = {"vocab_size": tokenizer.vocab_size, "context_length": 96, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1}
    model = Transformer(ModelConfig.from_preset("tiny", **{**cfg, **overrides}))
    save_model_dir(model, path, tokenizer)
    return path


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path
