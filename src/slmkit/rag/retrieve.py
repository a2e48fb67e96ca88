"""Query -> ranked chunks: BM25 (FTS5), dense (vectors), hybrid (reciprocal-rank fusion of the
two, k = 60), then optionally reranked by a model and diversified by MMR.

A retriever is named `base[+mmr]`, base one of `RANKERS` (a module may register another). Equal
scores are ordered by document id and position, so a ranking depends on the indexed content only,
never on the order it was added in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmkit.errors import InputError
from slmkit.rag.index import Index
from slmkit.rag.store import Chunk, Filters

RRF_K = 60
Ranking = list[tuple[int, float]]  # (chunk id, score), best first


def bm25(index: Index, query: str, n: int, filters: Filters | None) -> Ranking:
    return _ordered(index, index.store.keyword_search(query, n, filters))


def dense(index: Index, query: str, n: int, filters: Filters | None) -> Ranking:
    return _ordered(index, index.vectors.search(index.embed_query(query), n, filters))[:n]


def _ordered(index: Index, ranking: Ranking) -> Ranking:
    """Best first; equal scores by document id and position, not by chunk id (the order of adding)."""
    keys = {c.id: (c.doc_id, c.ord) for c in index.store.chunks([c for c, _ in ranking]).values()}
    return sorted(((c, s) for c, s in ranking if c in keys), key=lambda item: (-item[1], keys[item[0]]))


def hybrid(index: Index, query: str, n: int, filters: Filters | None) -> Ranking:
    return rrf([bm25(index, query, n, filters), dense(index, query, n, filters)])[:n]


def rrf(rankings: list[Ranking], k: int = RRF_K) -> Ranking:
    """Reciprocal-rank fusion: sum over rankings of 1 / (k + rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (chunk, _) in enumerate(ranking, 1):
            scores[chunk] = scores.get(chunk, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])  # ties: the caller orders them by document


RANKERS: dict[str, Callable[[Index, str, int, Filters | None], Ranking]] = {"bm25": bm25, "dense": dense, "hybrid": hybrid}
MODIFIERS = ("mmr",)


def retriever_names() -> list[str]:
    return [*RANKERS, *(f"{name}+mmr" for name in RANKERS)]


@dataclass
class Hit:
    chunk: Chunk
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.chunk.to_dict(), "score": self.score}


@dataclass
class Retriever:
    """How to search: `name` (e.g. "hybrid+mmr"), candidates drawn per ranking, MMR's balance of
    relevance against redundancy, and a reranker (`rerank.LikelihoodReranker`) of the first
    `rerank_top` candidates."""

    name: str = "hybrid"
    candidates: int = 50
    mmr_lambda: float = 0.5
    reranker: Any = None
    rerank_top: int = 20
    base: str = field(init=False)
    mmr: bool = field(init=False)

    def __post_init__(self) -> None:
        self.base, *mods = self.name.split("+")
        if self.base not in RANKERS or any(m not in MODIFIERS for m in mods):
            raise InputError(f"unknown retriever {self.name!r}; choose one of {', '.join(retriever_names())}")
        self.mmr = "mmr" in mods
        if not 0 <= self.mmr_lambda <= 1:
            raise InputError(f"mmr_lambda must be between 0 and 1, not {self.mmr_lambda}")

    def search(self, index: Index, query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """The `k` best chunks for `query` among those that pass `filters` ({key: [values]})."""
        if not query.strip():
            raise InputError("the query is empty")
        if k < 1:
            raise InputError(f"top-k must be at least 1, not {k}")
        n = max(k, self.candidates)
        ranking = RANKERS[self.base](index, query, n, filters)
        chunks = index.store.chunks([c for c, _ in ranking])
        hits = sorted((Hit(chunks[c], s) for c, s in ranking if c in chunks),
                      key=lambda h: (-h.score, h.chunk.doc_id, h.chunk.ord))
        if self.reranker is not None:
            top, rest = hits[: self.rerank_top], hits[self.rerank_top :]
            scores = self.reranker.score(query, [h.chunk.text for h in top])
            hits = sorted((Hit(h.chunk, s) for h, s in zip(top, scores)), key=lambda h: (-h.score, h.chunk.doc_id, h.chunk.ord)) + rest
        if self.mmr:
            hits = mmr(index, hits, k, self.mmr_lambda)
        return hits[:k]


def mmr(index: Index, hits: list[Hit], k: int, balance: float) -> list[Hit]:
    """Maximal marginal relevance: each pick maximizes balance * relevance - (1 - balance) *
    max similarity to the chunks already picked. Relevance is the ranking's own score scaled to
    [0, 1] (so hybrid stays hybrid); similarity is the cosine of the chunks' embeddings."""
    if len(hits) <= 1:
        return hits
    _, vectors = index.store.vectors([h.chunk.id for h in hits])
    scores = np.array([h.score for h in hits])
    spread = scores.max() - scores.min()
    relevance = (scores - scores.min()) / spread if spread > 0 else np.ones(len(hits))
    chosen: list[int] = []
    redundancy = np.zeros(len(hits))
    left = list(range(len(hits)))
    while left and len(chosen) < k:
        best = left.pop(int(np.argmax([balance * relevance[i] - (1 - balance) * redundancy[i] for i in left])))
        chosen.append(best)
        redundancy = np.maximum(redundancy, vectors @ vectors[best])
    return [hits[i] for i in chosen] + [hits[i] for i in left]


def parse_filters(pairs: list[str]) -> Filters:
    """["status=Final", "status=Active", "type=Process"] -> {"status": ["Final", "Active"], "type": ["Process"]}."""
    filters: Filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"a filter is KEY=VALUE, not {pair!r}")
        filters.setdefault(key, []).append(value)
    return filters
