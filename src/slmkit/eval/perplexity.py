"""Perplexity and bits-per-byte of a model on text files.

Each document is scored on its own, starting from the end-of-text token (the document boundary
the model saw in training), so every token of the text is predicted. Documents longer than the
context are covered by sliding windows: window k ends `stride` tokens after window k-1 and
scores only the tokens that window k-1 did not, so each token is scored exactly once, with at
least `context - stride` tokens of context (except near the start). stride == context gives
disjoint windows; a smaller stride costs more compute and gives each token more context.

Perplexity depends on the tokenizer; bits-per-byte (total NLL in bits / UTF-8 bytes of the text)
does not, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slmkit.data.corpus import Corpus
from slmkit.errors import InputError
from slmkit.generation.decode import model_device
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    documents: int
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text
    nll: float  # mean negative log-likelihood per token, in nats
    perplexity: float
    bits_per_byte: float

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"documents      {self.documents}\n"
            f"tokens         {self.tokens}\n"
            f"bytes          {self.bytes}\n"
            f"mean NLL       {self.nll:.4f} nats/token\n"
            f"perplexity     {self.perplexity:.4f}\n"
            f"bits per byte  {self.bits_per_byte:.4f}"
        )


@dataclass
class Window:
    ids: list[int]  # model input
    targets: list[int]  # the next token after each input position
    scored: int  # how many of the last targets are new (scored in this window)


def windows(ids: Sequence[int], context: int, stride: int) -> Iterator[Window]:
    """Windows over one sequence that together score every token after the first exactly once."""
    last = len(ids) - 1  # targets are ids[1:], so inputs end at most at index len - 2
    end, scored_up_to = 0, 0
    while scored_up_to < last:
        end = min(end + (context if end == 0 else stride), last)
        begin = max(0, end - context)
        yield Window(list(ids[begin:end]), list(ids[begin + 1 : end + 1]), end - scored_up_to)
        scored_up_to = end


@torch.inference_mode()
def score_windows(model: Transformer, batch: list[Window]) -> float:
    """Summed NLL (nats) of the scored targets of a batch of windows. Windows are right-padded:
    in a causal model padding after a token cannot change its prediction."""
    device = model_device(model)
    width = max(len(w.ids) for w in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
    targets = torch.full((len(batch), width), -100, dtype=torch.long, device=device)  # -100: not scored
    for row, w in enumerate(batch):
        ids[row, : len(w.ids)] = torch.tensor(w.ids)
        new = len(w.ids) - w.scored
        targets[row, new : len(w.ids)] = torch.tensor(w.targets[new:])
    logits = model(ids).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()


def perplexity_of_texts(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Score documents given as strings (see module docstring for windows and boundaries)."""
    context = model.cfg.context_length if context is None else context
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= context <= model.cfg.context_length:
        raise InputError(f"context must be between 1 and the model's context length {model.cfg.context_length}, not {context}")
    if not 1 <= stride <= context:
        raise InputError(f"stride must be between 1 and the context ({context}), not {stride}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, not {batch_size}")
    start = [tokenizer.eot_id] if tokenizer.eot_token else []
    documents = tokens = n_bytes = 0
    total_nll = 0.0
    pending: list[Window] = []
    for text in tqdm(texts, desc="scoring", unit="doc", disable=not progress):
        ids = start + tokenizer.encode_ordinary(text)
        documents += 1
        n_bytes += len(text.encode("utf-8"))
        for window in windows(ids, context, stride):
            tokens += window.scored
            pending.append(window)
            if len(pending) == batch_size:
                total_nll += score_windows(model, pending)
                pending = []
    if pending:
        total_nll += score_windows(model, pending)
    if tokens == 0:
        raise InputError("no tokens to score: the documents are empty or one token long")
    nll = total_nll / tokens
    return PerplexityResult(documents, tokens, n_bytes, nll, math.exp(nll), total_nll / math.log(2) / n_bytes)


def perplexity(
    model: Transformer,
    tokenizer: Tokenizer,
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity and bits-per-byte of `model` on the documents of files or directories.
    `context` defaults to the model's, `stride` to half the context."""
    corpus = Corpus(paths, text_field=text_field)
    return perplexity_of_texts(model, tokenizer, corpus, context, stride, batch_size, progress)
