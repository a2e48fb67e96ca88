"""Nearest chunks by vector: exact (numpy, the default) or approximate (usearch HNSW, for indexes
of `ann_threshold` chunks and more); the Qdrant backend (`qdrant`) offers the same three calls.

The vectors themselves live in SQLite (`store`); these indexes are derived from them. The
approximate one is saved as `vectors-G.usearch` for the store's generation G: a file of another
generation (an update crashed after its commit) or one that does not load is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from slmkit.errors import MissingExtraError
from slmkit.rag.store import Filters, Store

DEFAULT_ANN_THRESHOLD = 250_000
Hits = list[tuple[int, float]]


class VectorIndex(Protocol):
    def search(self, query: np.ndarray, k: int, filters: Filters | None = None) -> Hits:
        """The `k` chunks nearest to `query` (and any tied with the last), as (chunk id, dot product)."""

    def stage(self, ids: Sequence[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        """Inside the update's transaction: make new chunks findable where that cannot wait for the commit."""

    def commit(self, removed: Sequence[int], ids: Sequence[int], vectors: np.ndarray) -> None:
        """After the update's commit: drop removed chunks, add new ones."""

    def close(self) -> None: ...


def top_k(keys: np.ndarray, scores: np.ndarray, k: int) -> Hits:
    """The k best (and those tied with the k-th), best first."""
    if len(scores) == 0 or k <= 0:
        return []
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = np.nonzero(scores >= kth)[0]
    else:
        keep = np.arange(len(scores))
    order = keep[np.argsort(-scores[keep], kind="stable")]
    return [(int(keys[i]), float(scores[i])) for i in order]


class ExactIndex:
    """Every vector in memory; a query is one matrix-vector product."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys, self.matrix = store.vectors()

    def search(self, query: np.ndarray, k: int, filters: Filters | None = None) -> Hits:
        keys, matrix = self.keys, self.matrix
        if filters:
            keys = np.intersect1d(self.keys, self.store.filtered_ids(filters))
            matrix = self.matrix[np.searchsorted(self.keys, keys)]
        return top_k(keys, matrix @ query.astype(np.float32), k)

    def stage(self, ids: Sequence[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        pass

    def commit(self, removed: Sequence[int], ids: Sequence[int], vectors: np.ndarray) -> None:
        keep = ~np.isin(self.keys, np.asarray(removed, dtype=np.int64))
        keys = np.concatenate([self.keys[keep], np.asarray(ids, dtype=np.int64)])
        matrix = np.concatenate([self.matrix[keep], vectors.astype(np.float32).reshape(len(ids), self.matrix.shape[1])])
        order = np.argsort(keys, kind="stable")
        self.keys, self.matrix = keys[order], matrix[order]

    def close(self) -> None:
        pass


class ApproxIndex:
    """usearch HNSW over inner products (the vectors have norm 1); filtered queries are exact over
    the chunks that pass the filter."""

    def __init__(self, store: Store, connectivity: int = 16, expansion_search: int = 64) -> None:
        try:
            import usearch.index
        except ImportError:
            raise MissingExtraError("usearch", "rag") from None
        self.store = store
        self.usearch = usearch.index
        self.settings = {"ndim": store.settings["embedder"]["dim"], "metric": "ip", "dtype": "f32",
                         "connectivity": connectivity, "expansion_search": expansion_search}
        self.index = self._load(store.generation)

    def _path(self, generation: int):
        return self.store.directory / f"vectors-{generation}.usearch"

    def _load(self, generation: int):
        index = self.usearch.Index(**self.settings)
        path = self._path(generation)
        if path.is_file():
            try:
                index.load(str(path))
                return index
            except Exception:  # a damaged file: rebuilt from the vectors in SQLite below
                index = self.usearch.Index(**self.settings)
        keys, matrix = self.store.vectors()
        if len(keys):
            index.add(keys, matrix)
        self._save(index, generation)
        return index

    def _save(self, index, generation: int) -> None:
        """Write through a temporary file; drop the files of other generations. A read-only index
        directory keeps the index in memory only."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".vectors.", suffix=".tmp", dir=self.store.directory)
        except OSError:
            return
        os.close(fd)
        try:
            index.save(tmp)
            os.replace(tmp, self._path(generation))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        for old in self.store.directory.glob("vectors-*.usearch"):
            if old != self._path(generation):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def search(self, query: np.ndarray, k: int, filters: Filters | None = None) -> Hits:
        if filters:
            keys, matrix = self.store.vectors(self.store.filtered_ids(filters))
            return top_k(keys, matrix @ query.astype(np.float32), k)
        if len(self.index) == 0:
            return []
        matches = self.index.search(query.astype(np.float32), min(k, len(self.index)))
        return [(int(key), 1.0 - float(d)) for key, d in zip(matches.keys, matches.distances)]

    def stage(self, ids: Sequence[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        pass

    def commit(self, removed: Sequence[int], ids: Sequence[int], vectors: np.ndarray) -> None:
        for key in removed:
            if self.index.contains(int(key)):
                self.index.remove(int(key))
        if len(ids):
            self.index.add(np.asarray(ids, dtype=np.int64), vectors.astype(np.float32))
        self._save(self.index, self.store.generation)

    def close(self) -> None:
        pass


def open_vectors(store: Store, kind: str | None = None) -> VectorIndex:
    """The vector index of `store`: its backend's, or `kind` ("exact" / "approx") to compare them."""
    backend = store.settings.get("backend", {"kind": "embedded"})
    if backend["kind"] == "qdrant":
        from slmkit.rag.qdrant import QdrantIndex

        return QdrantIndex(store, backend["location"], backend["collection"])
    if kind is None:
        threshold = backend.get("ann_threshold", DEFAULT_ANN_THRESHOLD)
        kind = "approx" if store.counts()[1] >= threshold else "exact"
    return ApproxIndex(store) if kind == "approx" else ExactIndex(store)
