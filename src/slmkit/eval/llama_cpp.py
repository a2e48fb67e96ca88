"""Scoring a GGUF file with llama.cpp (through llama-cpp-python), to compare runtimes on the very
same token ids: perplexity over the windows of `slmkit.eval.perplexity`, and greedy continuations."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence

import numpy as np

from slmkit.errors import MissingExtraError
from slmkit.eval.perplexity import windows


def open_gguf(path: str | os.PathLike, n_ctx: int, logits_all: bool = False, n_threads: int | None = None):
    """A llama_cpp.Llama on a GGUF file; call `.close()` when done."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MissingExtraError("llama-cpp-python", "llama-cpp") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                 n_threads=n_threads or os.cpu_count(), verbose=False)


def greedy_ids(llm, prompt: Sequence[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of token ids (it never stops by itself)."""
    return list(itertools.islice(llm.generate(list(prompt), temp=0.0, top_k=1, reset=True), n))


def nll_of_windows(llm, documents: Sequence[Sequence[int]], context: int, stride: int) -> tuple[float, int]:
    """Summed NLL (nats) and count of scored tokens, with the same windows as slmkit's perplexity."""
    total, count = 0.0, 0
    for ids in documents:
        for w in windows(ids, context, stride):
            llm.reset()
            llm.eval(w.ids)
            logits = np.asarray(llm.scores[: len(w.ids)], dtype=np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            new = len(w.ids) - w.scored
            targets = np.asarray(w.targets[new:])
            total -= float(logp[np.arange(new, len(w.ids)), targets].sum())
            count += w.scored
    return total, count


def perplexity_of_ids(llm, documents: Sequence[Sequence[int]], context: int, stride: int | None = None) -> float:
    total, count = nll_of_windows(llm, documents, context, stride or max(1, context // 2))
    return math.exp(total / count)
