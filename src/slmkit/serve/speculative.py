"""Drafters for speculative decoding: cheap guesses of a sequence's next tokens.

The engine feeds a sequence's last token and the k drafted tokens to the target model in one
forward pass, keeps the drafts up to the first one the target would not have chosen (greedy), and
adds the target's own token there. Output is therefore exactly what greedy decoding gives; the
speed-up depends on how often the drafts are accepted.

Any object with `propose` and `forget` is a drafter. `DraftModel` runs a smaller model with the
same tokenizer; a model's own multi-token-prediction heads fit the same interface.
"""

from __future__ import annotations

from typing import Protocol

import torch

from slmkit.errors import InputError
from slmkit.model.attention import KVCache
from slmkit.model.transformer import Transformer


class Drafter(Protocol):
    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """Up to k guesses of the tokens that follow `tokens` (the whole sequence so far)."""

    def forget(self, seq_id: int) -> None:
        """The sequence has finished or was preempted: drop what is kept for it."""


class DraftModel:
    """Greedy drafts from a small model, with a KV cache per sequence that is rolled back to the
    longest prefix still shared with the sequence (rejected drafts are dropped)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.caches: dict[int, tuple[KVCache, list[int]]] = {}  # seq -> (cache, tokens it holds)

    @torch.inference_mode()
    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        k = min(k, self.model.cfg.context_length - len(tokens))
        if k <= 0:
            return []
        cache, fed = self.caches.get(seq_id) or (self.model.new_cache(1), [])
        shared = 0
        for a, b in zip(fed, tokens):
            if a != b:
                break
            shared += 1
        cache.length = min(shared, len(tokens) - 1)  # at least the last token is fed again
        fed = tokens[: cache.length]
        device = self.model.embed_tokens.weight.device
        new = tokens[cache.length :]
        drafts: list[int] = []
        for _ in range(k):
            logits = self.model(torch.tensor([new], device=device), cache=cache)[0, -1]
            fed += new
            drafts.append(int(logits.argmax()))
            new = drafts[-1:]
        self.caches[seq_id] = (cache, fed)
        return drafts

    def forget(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)


def early_exit_draft(model: Transformer, n_layers: int) -> Transformer:
    """A draft made of the model's own first `n_layers` blocks, final norm and head (weights
    shared, no copy): self-speculation by early exit, for a model without a separate draft."""
    from dataclasses import replace

    if not 1 <= n_layers < model.cfg.n_layers:
        raise InputError(f"an early-exit draft needs 1 to {model.cfg.n_layers - 1} layers, not {n_layers}")
    p = model.embed_tokens.weight
    with torch.device("meta"):
        draft = Transformer(replace(model.cfg, n_layers=n_layers))
    draft.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers},
        strict=True, assign=True,
    )
    for name, buffer in model.named_buffers():  # non-persistent buffers (RoPE tables) are not in the state dict
        module_name, _, attr = name.rpartition(".")
        if not module_name.startswith("layers.") or int(module_name.split(".")[1]) < n_layers:
            setattr(draft.get_submodule(module_name), attr, buffer)
    return draft.to(p.device).eval()
