"""Writing an index: `build_index` (new), `add` (new and edited documents), `remove`.

Inputs are read as `data prepare` reads them (`slmkit.data.Corpus`): a text file is one document
whose id is its path; every record of a .jsonl/.csv/.tsv file is one, with the value of
`id_field` as its id (default: `path:line`) and its other fields as metadata. A document whose
content hash is unchanged is skipped; an edited one replaces its chunks; a record missing from a
file that is read again is removed. All of an update's writes are one transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit._io import atomic_dir
from slmkit.data.corpus import Corpus, Document
from slmkit.errors import InputError
from slmkit.rag.chunking import ChunkConfig, chunk_text
from slmkit.rag.embedders import MINILM, Embedder, load_embedder
from slmkit.rag.index import Index
from slmkit.rag.qdrant import create_collection, payload
from slmkit.rag.store import SCHEMA_VERSION, NewDocument, Store
from slmkit.rag.vectors import DEFAULT_ANN_THRESHOLD
from slmkit.tokenizer import Tokenizer

EMBED_BATCH = 256  # chunks per progress step


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    chunk_seconds: float = 0.0
    embed_seconds: float = 0.0
    total_chunks: int = 0

    def summary(self) -> str:
        rate = f", {self.chunks_added / self.embed_seconds:.1f} chunks/s embedded" if self.embed_seconds else ""
        return (f"{len(self.added)} added, {len(self.replaced)} replaced, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged documents; {self.chunks_added} chunks written, {self.chunks_removed} "
                f"removed{rate}; the index holds {self.total_chunks} chunks")

    def to_dict(self) -> dict[str, Any]:
        return {"added": len(self.added), "replaced": len(self.replaced), "removed": len(self.removed),
                "unchanged": self.unchanged, "chunks_added": self.chunks_added, "chunks_removed": self.chunks_removed,
                "chunk_seconds": self.chunk_seconds, "embed_seconds": self.embed_seconds, "total_chunks": self.total_chunks}


def build_index(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer: Tokenizer | str | os.PathLike,
    *,
    embedder: str | Embedder = MINILM,
    pooling: str = "mean",
    embedder_model: str | None = None,
    chunking: ChunkConfig | None = None,
    id_field: str | None = None,
    text_field: str = "text",
    metadata: dict[str, str] | None = None,
    qdrant: str | None = None,
    collection: str | None = None,
    ann_threshold: int = DEFAULT_ANN_THRESHOLD,
    errors: str = "strict",
    skip_unreadable: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> UpdateReport:
    """A new index of `paths` at `out`, its chunks counted in `tokenizer` (the answering model's, or
    its directory). With `qdrant` (a URL, or a folder for Qdrant's local mode) the vectors go to
    the Qdrant `collection` (default: the index's directory name)."""
    tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    chunking = chunking or ChunkConfig()
    if ann_threshold < 0:
        raise InputError(f"ann_threshold must be 0 or more, not {ann_threshold}")
    corpus = Corpus(paths, text_field=text_field, errors=errors, skip_unreadable=skip_unreadable)
    if not corpus.files:
        raise InputError(f"no documents found in {', '.join(map(str, paths))}; give .txt/.md/.rst/.py, .jsonl or "
                         ".csv/.tsv files with text")
    embed = embedder if not isinstance(embedder, str) else load_embedder(
        embedder, pooling=pooling, model=embedder_model, device=device)
    spec = embedder if isinstance(embedder, str) else embed.identity()["name"]
    if qdrant:
        location = qdrant if qdrant.startswith(("http://", "https://")) else str(Path(qdrant).resolve())
        backend = {"kind": "qdrant", "location": location, "collection": collection or Path(out).resolve().name}
    else:
        backend = {"kind": "embedded", "ann_threshold": ann_threshold}
    with atomic_dir(out, force) as tmp:
        store = Store(tmp, create=True)
        tokenizer.save(tmp)
        with store.transaction() as db:
            store.put_settings(db, schema_version=SCHEMA_VERSION, embedder={"spec": spec, **embed.identity()},
                               chunking=chunking.to_dict(), tokenizer=tokenizer.fingerprint(), backend=backend,
                               id_field=id_field, text_field=text_field)
        store.close()
        if qdrant:
            create_collection(backend["location"], backend["collection"], embed.dim, force=force)
        index = Index(tmp, embedder=embed)
        try:
            report = _update(index, corpus.documents(), metadata or {}, progress)
        finally:
            index.close()
    return report


def add(index: Index | str | os.PathLike, paths: Sequence[str | os.PathLike], *, metadata: dict[str, str] | None = None,
        errors: str = "strict", skip_unreadable: bool = False, embedder: Embedder | None = None,
        progress: bool = True) -> UpdateReport:
    """Add new documents, replace edited ones, skip unchanged ones (by content hash)."""
    opened = index if isinstance(index, Index) else Index(index, embedder=embedder)
    try:
        corpus = Corpus(paths, text_field=opened.settings["text_field"], errors=errors, skip_unreadable=skip_unreadable)
        return _update(opened, corpus.documents(), metadata or {}, progress)
    finally:
        if opened is not index:
            opened.close()


def remove(index: Index | str | os.PathLike, targets: Sequence[str]) -> UpdateReport:
    """Remove documents by id, or every document read from a file or from files under a folder."""
    opened = index if isinstance(index, Index) else Index(index)
    try:
        doc_ids: list[str] = []
        for target in targets:
            found = opened.store.documents_under(target) or opened.store.documents_under(_path_key(target))
            if not found:
                raise InputError(f"no document with id {target!r} or read from {target!r} in {opened.directory}; "
                                 "nothing was removed")
            doc_ids += found
        report = UpdateReport()
        _write(opened, list(dict.fromkeys(doc_ids)), [], report)
        return report
    finally:
        if opened is not index:
            opened.close()


# ---------------------------------------------------------------------------- the update
def _path_key(path: str | os.PathLike) -> str:
    return Path(os.path.normpath(path)).as_posix()


def document_id(document: Document, id_field: str | None) -> str:
    source = _path_key(document.path)
    if document.line is None:
        return source
    if id_field is None:
        return f"{source}:{document.line}"
    value = (document.fields or {}).get(id_field)
    if value is None or isinstance(value, (dict, list)) or value == "":
        raise InputError(f"{source}:{document.line}: no usable {id_field!r} field for the document id (--id-field)")
    return str(value)


def content_hash(text: str, metadata: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([text, metadata], sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _update(index: Index, documents: Iterable[Document], extra_metadata: dict[str, str], progress: bool) -> UpdateReport:
    """Read `documents`, work out what changed, chunk and embed that, write it in one transaction."""
    from tqdm.auto import tqdm

    store, settings = index.store, index.settings
    known = store.document_hashes()
    report = UpdateReport()
    incoming: dict[str, tuple[Document, str, dict[str, Any]]] = {}
    sources: set[str] = set()
    for document in documents:
        doc_id = document_id(document, settings["id_field"])
        if doc_id in incoming:
            raise InputError(f"document id {doc_id!r} appears twice in the input; ids must be unique (--id-field)")
        meta = {**(document.fields or {}), **extra_metadata}
        incoming[doc_id] = (document, content_hash(document.text, meta), meta)
        sources.add(_path_key(document.path))
    gone = [d for d, (_, source) in known.items() if source in sources and d not in incoming]
    todo = []
    for doc_id, (document, digest, meta) in incoming.items():
        if doc_id in known and known[doc_id][0] == digest:
            report.unchanged += 1
        else:
            (report.replaced if doc_id in known else report.added).append(doc_id)
            todo.append((doc_id, document, digest, meta))

    # chunk, then embed every new chunk in batches
    tokenizer, config = index.tokenizer, ChunkConfig(**settings["chunking"])
    embed = index.embedder.embed if config.method == "semantic" else None
    started = time.perf_counter()
    pending = []
    for doc_id, document, digest, meta in tqdm(todo, desc="chunking", unit="doc", disable=not progress or not todo):
        headings = Path(document.path).suffix.lower() != ".py"
        spans = chunk_text(document.text, tokenizer, config, headings=headings, embed=embed)
        pending.append(NewDocument(doc_id, _path_key(document.path), document.line, digest, meta, document.text, spans,
                                   np.zeros((0, 0))))
    report.chunk_seconds = time.perf_counter() - started
    texts = [_embedding_text(d, s) for d in pending for s in d.spans]
    started = time.perf_counter()
    vectors = []
    with tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not progress or not texts) as bar:
        for i in range(0, len(texts), EMBED_BATCH):
            vectors.append(index.embedder.embed(texts[i : i + EMBED_BATCH]))
            bar.update(len(vectors[-1]))
    report.embed_seconds = time.perf_counter() - started if texts else 0.0
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, settings["embedder"]["dim"]), np.float32)
    offset = 0
    for d in pending:
        d.vectors, offset = matrix[offset : offset + len(d.spans)], offset + len(d.spans)
    report.removed = gone
    _write(index, gone + report.replaced, pending, report)
    return report


def _embedding_text(document: NewDocument, span) -> str:
    """What a chunk is embedded as: its heading path, then its text."""
    text = document.text[span.start : span.end]
    return f"{span.heading}\n{text}" if span.heading else text


def _write(index: Index, doc_ids: list[str], documents: list[NewDocument], report: UpdateReport) -> None:
    store = index.store
    if not doc_ids and not documents:
        report.total_chunks = store.counts()[1]
        return
    vectors = index.vectors
    external = store.settings["backend"]["kind"] == "qdrant"
    if external:
        vectors.flush_tombstones()  # left by an update that stopped after its commit
    new_ids: list[int] = []
    with store.transaction() as db:
        removed = store.delete_documents(db, doc_ids, tombstones=external)
        payloads = []
        for d in documents:
            ids = store.insert_document(db, d)
            new_ids += ids
            payloads += [payload(d.doc_id, d.source, s.heading, d.text[s.start : s.end], d.metadata) for s in d.spans]
        matrix = (np.concatenate([d.vectors for d in documents]) if documents
                  else np.zeros((0, store.settings["embedder"]["dim"]), np.float32))
        vectors.stage(new_ids, matrix, payloads)
    vectors.commit(removed, new_ids, matrix)
    index.updated()
    report.chunks_added, report.chunks_removed = len(new_ids), len(removed)
    report.total_chunks = store.counts()[1]
