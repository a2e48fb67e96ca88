"""One forward pass of the model over a scheduled batch, on the paged KV pool it owns."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slmkit.model.transformer import Transformer
from slmkit.serve.adapters import MultiLoRA
from slmkit.serve.kv_pages import KVPool, PagedBatch
from slmkit.serve.scheduler import Scheduled


@dataclass
class StepResult:
    logits: torch.Tensor | None  # [P, vocab] fp32 where tokens are chosen (see `ModelRunner.run`); None: none are
    last_hidden: torch.Tensor  # [B, T, d] before the final norm, row b for batch[b]'s fed tokens (MTP drafting)
    prompt_logits: torch.Tensor | None = None  # [Q, vocab] fp32 at each sequence's `prompt_rows`; None: none asked


class ModelRunner:
    """Builds a step's inputs (padded token ids, the `PagedBatch` cache view, each row's adapter),
    runs the model and computes logits only where a token is chosen or a prompt token is scored."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, adapters: MultiLoRA | None = None) -> None:
        self.model, self.adapters = model, adapters
        p = model.embed_tokens.weight
        self.device = p.device
        self.pool = KVPool(model.cfg, num_blocks, block_size, p.device, p.dtype)

    @torch.inference_mode()
    def run(self, batch: list[Scheduled]) -> StepResult:
        """Logits rows, in batch order, for each sequence whose step `samples`: its last fed token,
        then each of its drafts (the token after each); and prompt logits at every `prompt_rows`."""
        # 1) inputs: one row per sequence, right-padded; the cache view places each row at its length
        width = max(len(item.tokens) for item in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, : len(item.tokens)] = torch.tensor(item.tokens)
        cache = PagedBatch(self.pool, [item.seq.blocks for item in batch], [item.start for item in batch],
                           [len(item.tokens) for item in batch])
        # 2) the forward pass, each row with its adapter
        names = [item.seq.request.adapter for item in batch]
        with self.adapters.selected(names) if self.adapters is not None else contextlib.nullcontext():
            out = self.model.forward_hidden(ids.to(self.device), cache=cache, positions=cache.positions)
        # 3) the head only where a token is chosen or scored: the output projection is the largest matmul
        picks = [(row, len(item.tokens) - 1 - len(item.drafts) + j)
                 for row, item in enumerate(batch) if item.samples for j in range(len(item.drafts) + 1)]
        scored = [(row, col) for row, item in enumerate(batch) for col in item.prompt_rows]
        both = picks + scored
        logits = self.model.head(out.hidden[[r for r, _ in both], [c for _, c in both]]).float() if both else None
        return StepResult(logits[: len(picks)] if picks else None, out.last_hidden,
                          logits[len(picks) :] if scored else None)

    @torch.inference_mode()
    def embed(self, prompts: Sequence[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states of the base model, one vector per prompt."""
        vectors = []
        for prompt in prompts:
            hidden = self.model.forward_hidden(torch.tensor([prompt], device=self.device)).hidden[0]
            vectors.append(hidden.float().mean(dim=0).tolist())
        return vectors
