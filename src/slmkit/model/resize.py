"""Vocabulary growth: when a tokenizer gains domain tokens, the model gains rows for them."""

from __future__ import annotations

import torch

from slmkit.errors import InputError
from slmkit.model.transformer import Transformer

# rows indexed by token id; the LM head's only when it is not tied to the embedding
_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")


def resize_token_embeddings(model: Transformer, vocab_size: int) -> Transformer:
    """A copy of `model` with `vocab_size` tokens. New rows of the embedding (and of an untied LM
    head) start at the mean of the existing rows, so new tokens begin as an "average" token
    instead of noise that would dominate the softmax; shrinking drops the last rows."""
    if vocab_size < 1:
        raise InputError(f"vocab_size must be positive, not {vocab_size}")
    p = model.embed_tokens.weight
    resized = Transformer(model.cfg.replace(vocab_size=vocab_size)).to(device=p.device, dtype=p.dtype)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    for name in _VOCAB_ROWS:
        if name in state:
            rows = state[name]
            extra = vocab_size - rows.shape[0]
            mean = rows.float().mean(dim=0, keepdim=True).to(rows.dtype)
            state[name] = torch.cat([rows, mean.expand(extra, *rows.shape[1:])]) if extra > 0 else rows[:vocab_size]
    resized.load_state_dict(state, strict=not model.cfg.tie_embeddings)
    return resized.train(model.training)
