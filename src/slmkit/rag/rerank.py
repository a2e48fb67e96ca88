"""Reranking with the user's own model: a passage scores the mean log-probability the model gives
the question when it reads the question after the passage (unsupervised passage reranking, UPR:
a passage that answers a question makes it predictable). No training and no extra model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer

PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"


class LikelihoodReranker:
    batch_size = 4

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> LikelihoodReranker:
        from slmkit.model.io import load

        return cls(*load(model_dir, device, dtype))

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """Mean log p(question tokens | passage prompt), one per passage (higher: more relevant)."""
        question = self.tokenizer.encode_ordinary(" " + query.strip())
        context = self.model.cfg.context_length
        question = question[: context // 2]
        rows = []
        for passage in passages:
            prompt = self.tokenizer.encode_ordinary(PROMPT.format(passage=passage.strip()))
            rows.append(prompt[-(context - len(question)) :] + question)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(rows), self.batch_size):
                batch = rows[i : i + self.batch_size]
                width = max(map(len, batch))
                ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
                for r, row in enumerate(batch):  # right padding: causal attention keeps real tokens unaffected
                    ids[r, : len(row)] = torch.tensor(row)
                hidden = self.model.forward_hidden(ids).hidden
                for r, row in enumerate(batch):
                    first = len(row) - len(question)  # question tokens are predicted from positions first-1 .. len-2
                    logits = self.model.head(hidden[r, first - 1 : len(row) - 1]).float()
                    targets = torch.tensor(question, device=device)
                    scores.append(torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean().item())
        return scores
