"""Drafters for speculative decoding: cheap guesses of a sequence's next tokens.

The engine feeds a sequence's last token and the k drafted tokens to the target model in one
forward pass, keeps the drafts up to the first one the target would not have chosen (greedy), and
adds the target's own token there. Output is therefore exactly what greedy decoding gives; the
speed-up depends on how often the drafts are accepted.

Any object with `propose` and `forget` is a drafter. `DraftModel` runs a smaller model with the
same tokenizer. `MTPDrafter` runs the model's own multi-token-prediction modules, which read the
main model's hidden states: a drafter that also has `observe` is handed them from every forward
pass of the engine.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from slmkit.errors import InputError
from slmkit.model.attention import KVCache
from slmkit.model.mtp import draft_tokens
from slmkit.model.transformer import Transformer


class Drafter(Protocol):
    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        """Up to k guesses of the tokens that follow `tokens` (the whole sequence so far)."""

    def forget(self, seq_id: int) -> None:
        """The sequence has finished or was preempted: drop what is kept for it."""


@runtime_checkable
class HiddenStateDrafter(Drafter, Protocol):
    def observe(self, seq_id: int, start: int, hidden: torch.Tensor) -> None:
        """The main model's last hidden states before its final norm, [T, d], of the tokens at
        positions start .. start + T - 1 of the sequence, from the pass that computed them. Rows
        past the sequence's eventual length (rejected drafts) are replaced by later calls."""


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


class MTPDrafter:
    """Drafts with the model's own multi-token-prediction modules: up to `mtp_depth` tokens per
    step, at the cost of the MTP blocks alone. Keeps each sequence's hidden states from the
    engine's passes; after a prefix-cache hit the history starts at the first computed token."""

    def __init__(self, model: Transformer) -> None:
        if model.mtp is None:
            raise InputError("drafting with MTP modules needs a model that has them (mtp_depth >= 1); "
                             "this model has none: use a draft model or early-exit layers instead")
        self.model = model
        self.hidden: dict[int, tuple[int, torch.Tensor]] = {}  # seq -> (position of row 0, rows [n, d])

    def observe(self, seq_id: int, start: int, hidden: torch.Tensor) -> None:
        offset, rows = self.hidden.get(seq_id, (start, hidden[:0]))
        if not offset <= start <= offset + len(rows):  # not contiguous with what is kept: start afresh
            offset, rows = start, hidden[:0]
        self.hidden[seq_id] = (offset, torch.cat([rows[: start - offset], hidden]))

    @torch.inference_mode()
    def propose(self, seq_id: int, tokens: list[int], k: int) -> list[int]:
        offset, rows = self.hidden.get(seq_id, (0, None))
        known = len(tokens) - 1 - offset  # every token but the newest has its hidden state
        if rows is None or known < 1 or len(rows) < known:
            return []
        return draft_tokens(self.model, rows[None, :known], tokens[offset:], min(k, len(self.model.mtp.layers)))

    def forget(self, seq_id: int) -> None:
        self.hidden.pop(seq_id, None)


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
