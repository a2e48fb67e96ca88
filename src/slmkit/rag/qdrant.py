"""The vector index in a Qdrant collection: a server or cluster by URL, or Qdrant's local mode (a
folder) for one machine and tests. Documents, chunk text and the BM25 table stay in the index's
SQLite file; the collection holds each chunk's vector with a payload (doc_id, source, heading,
text, metadata as strings) so that Qdrant-side tools can read it and filters run in Qdrant.

Updates cannot be one transaction across SQLite and Qdrant, so they are ordered to stay safe:
new points are upserted before the SQLite commit (their ids are not visible until it); removed
chunks are written to `vector_tombstones` in the commit and deleted from Qdrant after it. A crash
in between leaves extra points, which searches drop (their ids are not in SQLite) and the next
update deletes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from slmkit.errors import InputError, MissingExtraError
from slmkit.rag.store import Filters, Store


def _client(location: str):
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise MissingExtraError("qdrant-client", "rag") from None
    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY"))
    return QdrantClient(path=location)


def create_collection(location: str, collection: str, dim: int, force: bool = False) -> None:
    """A new collection of `dim`-dim dot-product vectors (norm-1 vectors: cosine similarity)."""
    from qdrant_client import models

    client = _client(location)
    try:
        if client.collection_exists(collection):
            if not force:
                raise InputError(f"Qdrant collection {collection!r} at {location} already exists; pass --force to replace it")
            client.delete_collection(collection)
        client.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT))
    finally:
        client.close()


class QdrantIndex:
    def __init__(self, store: Store, location: str, collection: str) -> None:
        from qdrant_client import models

        self.models = models
        self.store, self.location, self.collection = store, location, collection
        self.client = _client(location)
        if not self.client.collection_exists(collection):
            self.client.close()
            raise InputError(f"the index's Qdrant collection {collection!r} at {location} does not exist; "
                             "rebuild the index with `slmkit rag index --force`")

    def _filter(self, filters: Filters | None):
        if not filters:
            return None
        m = self.models
        key = {"doc_id": "doc_id", "source": "source"}
        return m.Filter(must=[m.FieldCondition(key=key.get(k, f"meta.{k}"), match=m.MatchAny(any=[str(v) for v in values]))
                              for k, values in filters.items()])

    def search(self, query: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        pending = len(self.store.tombstones())  # points that may still be there after a crash
        points = self.client.query_points(self.collection, query=query.astype(np.float32).tolist(), limit=k + pending,
                                          query_filter=self._filter(filters), with_payload=False).points
        live = self.store.chunks([p.id for p in points]) if points else {}
        return [(int(p.id), float(p.score)) for p in points if p.id in live][:k]

    def stage(self, ids: Sequence[int], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        m = self.models
        for i in range(0, len(ids), 256):
            self.client.upsert(self.collection, points=[
                m.PointStruct(id=int(c), vector=v.astype(np.float32).tolist(), payload=p)
                for c, v, p in zip(ids[i : i + 256], vectors[i : i + 256], payloads[i : i + 256])])

    def commit(self, removed: Sequence[int], ids: Sequence[int], vectors: np.ndarray) -> None:
        self.flush_tombstones()

    def flush_tombstones(self) -> None:
        """Delete from Qdrant the chunks that SQLite has removed."""
        gone = self.store.tombstones()
        for i in range(0, len(gone), 1000):
            part = gone[i : i + 1000]
            self.client.delete(self.collection, points_selector=self.models.PointIdsList(points=part))
            with self.store.transaction() as db:
                db.executemany("DELETE FROM vector_tombstones WHERE chunk = ?", [(c,) for c in part])

    def close(self) -> None:
        self.client.close()


def payload(doc_id: str, source: str, heading: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]:
    return {"doc_id": doc_id, "source": source, "heading": heading, "text": text,
            "meta": {k: v if isinstance(v, str) else str(v) for k, v in metadata.items()}}
