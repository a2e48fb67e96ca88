"""The index directory: one SQLite file holds documents, chunks, their vectors and an FTS5 table
for BM25; the vector index over them is derived (see `vectors`).

    INDEX/
      index.sqlite        settings, documents, chunks (+ embedding), chunks_fts (FTS5, BM25)
      tokenizer.json      the tokenizer chunk sizes are counted in (+ tokenizer_config.json)
      vectors-G.usearch   approximate vector index at generation G (large indexes only)

Every update is one SQLite transaction, so a crash leaves the previous index; each committed
update bumps `generation`, and a vector file of another generation is rebuilt from the vectors
in SQLite. Ids of documents and chunks are never reused (AUTOINCREMENT): tables that annotate
chunks (a knowledge graph, say) reference `chunks(id)` with ON DELETE CASCADE and are cleaned up
by the same transaction that removes a document.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.errors import InputError

SCHEMA_VERSION = 1
DB_FILE = "index.sqlite"

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL UNIQUE,      -- the file path, or the --id-field value of a record
    source TEXT NOT NULL,             -- the file it was read from
    line INTEGER,                     -- first line of its record in a .jsonl/.csv/.tsv file
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,           -- JSON object: the record's other fields, --meta values
    text TEXT NOT NULL                -- chunk and citation offsets index this text
);
CREATE INDEX documents_source ON documents(source);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,             -- position in its document
    start_char INTEGER NOT NULL,
    end_char INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    heading TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL           -- float32, norm 1
);
CREATE INDEX chunks_document ON chunks(document);
CREATE VIRTUAL TABLE chunks_fts USING fts5(heading, text, content='chunks', content_rowid='id',
                                           tokenize='porter unicode61');
CREATE TRIGGER chunks_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, heading, text) VALUES (new.id, new.heading, new.text);
END;
CREATE TRIGGER chunks_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, heading, text) VALUES ('delete', old.id, old.heading, old.text);
END;
CREATE TABLE vector_tombstones (chunk INTEGER PRIMARY KEY);  -- removed chunks an external vector store still holds
"""


@dataclass
class Chunk:
    id: int
    doc_id: str
    source: str
    line: int | None
    ord: int
    start: int
    end: int
    tokens: int
    heading: str
    text: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"chunk_id": self.id, "doc_id": self.doc_id, "source": self.source, "line": self.line, "ord": self.ord,
                "start": self.start, "end": self.end, "heading": self.heading, "text": self.text, "metadata": self.metadata}


@dataclass
class NewDocument:
    """A document ready to be written: its chunk spans and their vectors."""

    doc_id: str
    source: str
    line: int | None
    content_hash: str
    metadata: dict[str, Any]
    text: str
    spans: list  # chunking.Span
    vectors: np.ndarray


Filters = dict[str, list[str]]


class Store:
    """An open index.sqlite. Reads see the last committed update; `transaction` makes one."""

    def __init__(self, directory: str | os.PathLike, *, create: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_FILE
        if not create and not self.path.is_file():
            raise InputError(f"{self.directory} is not a slmkit index (no {DB_FILE}); build one with `slmkit rag index`")
        try:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA foreign_keys = ON")
            if create:
                self.db.executescript(SCHEMA)
            self.settings = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM settings")}
        except sqlite3.DatabaseError as e:
            raise self.corrupt(e) from None
        if not create and self.settings.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{self.path} has index schema {self.settings.get('schema_version')!r}, this slmkit reads "
                             f"{SCHEMA_VERSION}; rebuild it with `slmkit rag index --force`")

    def corrupt(self, e: Exception) -> InputError:
        return InputError(f"{self.path} is damaged or not a slmkit index ({e}); rebuild it with `slmkit rag index --force`")

    def close(self) -> None:
        self.db.close()

    # ----------------------------------------------------------------- reads
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise self.corrupt(e) from None

    @property
    def generation(self) -> int:
        row = self.query("SELECT value FROM settings WHERE key = 'generation'")
        return int(json.loads(row[0][0])) if row else 0

    def counts(self) -> tuple[int, int]:
        """(documents, chunks)."""
        return self.query("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)")[0]

    def document_hashes(self) -> dict[str, tuple[str, str]]:
        """doc_id -> (content_hash, source)."""
        return {d: (h, s) for d, h, s in self.query("SELECT doc_id, content_hash, source FROM documents")}

    def documents_under(self, target: str) -> list[str]:
        """Ids of the documents whose id is `target`, or that were read from `target` or a file under it."""
        prefix = target.rstrip("/") + "/"
        rows = self.query("SELECT doc_id FROM documents WHERE doc_id = ? OR source = ? OR substr(source, 1, ?) = ?",
                          (target, target, len(prefix), prefix))
        return [r[0] for r in rows]

    def document_text(self, doc_id: str) -> str:
        rows = self.query("SELECT text FROM documents WHERE doc_id = ?", (doc_id,))
        if not rows:
            raise InputError(f"no document {doc_id!r} in {self.directory}")
        return rows[0][0]

    def chunks(self, ids: Sequence[int]) -> dict[int, Chunk]:
        """The chunks with these ids that exist (a removed id is absent)."""
        out: dict[int, Chunk] = {}
        ids = list(dict.fromkeys(int(i) for i in ids))
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows = self.query(
                "SELECT c.id, d.doc_id, d.source, d.line, c.ord, c.start_char, c.end_char, c.tokens, c.heading, c.text, "
                f"d.metadata FROM chunks c JOIN documents d ON d.id = c.document WHERE c.id IN ({','.join('?' * len(part))})",
                part)
            for r in rows:
                out[r[0]] = Chunk(*r[:10], json.loads(r[10]))
        return out

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, [n, dim] vectors) of every chunk in id order, or of `ids` in their order."""
        dim = self.settings["embedder"]["dim"]
        if ids is None:
            rows = self.query("SELECT id, embedding FROM chunks ORDER BY id")
        else:
            found = {}
            ids = [int(i) for i in ids]
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                found.update(self.query(f"SELECT id, embedding FROM chunks WHERE id IN ({','.join('?' * len(part))})", part))
            rows = [(i, found[i]) for i in ids if i in found]
        keys = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return keys, matrix

    def keyword_search(self, query: str, n: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """BM25 over chunk text and headings (FTS5; any query word may match): (chunk id, score),
        best first, the score negated so that higher is better."""
        match = fts_query(query)
        if not match:
            return []
        where, params = filter_sql(filters)
        sql = ("SELECT f.rowid, bm25(chunks_fts, 0.5, 1.0) AS s FROM chunks_fts f"
               + (" JOIN chunks c ON c.id = f.rowid JOIN documents d ON d.id = c.document" if where else "")
               + f" WHERE chunks_fts MATCH ?{where} ORDER BY s LIMIT ?")
        return [(r[0], -r[1]) for r in self.query(sql, [match, *params, n])]

    def filtered_ids(self, filters: Filters) -> np.ndarray:
        where, params = filter_sql(filters)
        rows = self.query(f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document WHERE 1{where}", params)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def tombstones(self) -> list[int]:
        return [r[0] for r in self.query("SELECT chunk FROM vector_tombstones")]

    # ----------------------------------------------------------------- writes
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic update: committed (and `generation` bumped) when the block succeeds."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as e:
            raise self.corrupt(e) from None
        try:
            yield self.db
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('generation', ?)", (json.dumps(self.generation + 1),))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def put_settings(self, db: sqlite3.Connection, **values: Any) -> None:
        for key, value in values.items():
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, json.dumps(value)))
            self.settings[key] = value

    def delete_documents(self, db: sqlite3.Connection, doc_ids: Sequence[str], tombstones: bool) -> list[int]:
        """Delete documents with their chunks, FTS rows and vectors; the removed chunk ids."""
        removed: list[int] = []
        for doc_id in doc_ids:
            chunks = [r[0] for r in db.execute(
                "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document WHERE d.doc_id = ?", (doc_id,))]
            db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))  # cascades to chunks -> chunks_fts
            removed += chunks
        if tombstones:
            db.executemany("INSERT OR IGNORE INTO vector_tombstones VALUES (?)", [(c,) for c in removed])
        return removed

    def insert_document(self, db: sqlite3.Connection, doc: NewDocument) -> list[int]:
        """Insert a document and its chunks; the new chunk ids."""
        cursor = db.execute("INSERT INTO documents (doc_id, source, line, content_hash, metadata, text) VALUES (?, ?, ?, ?, ?, ?)",
                            (doc.doc_id, doc.source, doc.line, doc.content_hash, json.dumps(doc.metadata, ensure_ascii=False),
                             doc.text))
        document = cursor.lastrowid
        ids = []
        vectors = np.ascontiguousarray(doc.vectors, dtype=np.float32)
        for ord_, (span, vector) in enumerate(zip(doc.spans, vectors)):
            cursor = db.execute(
                "INSERT INTO chunks (document, ord, start_char, end_char, tokens, heading, text, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (document, ord_, span.start, span.end, span.tokens, span.heading, doc.text[span.start : span.end],
                 vector.tobytes()))
            ids.append(cursor.lastrowid)
        return ids


def fts_query(text: str) -> str:
    """A question -> an FTS5 query matching any of its words (quoted, so no word is an operator)."""
    import regex

    words = dict.fromkeys(w.lower() for w in regex.findall(r"[\p{L}\p{N}_]+", text))
    return " OR ".join(f'"{w}"' for w in words)


def filter_sql(filters: Filters | None) -> tuple[str, list[str]]:
    """` AND ...` over documents `d` for metadata filters: every key must match one of its values.
    `doc_id` and `source` filter on the document's own id and file."""
    if not filters:
        return "", []
    clauses, params = [], []
    for key, values in filters.items():
        column = f"d.{key}" if key in ("doc_id", "source") else "CAST(json_extract(d.metadata, ?) AS TEXT)"
        if key not in ("doc_id", "source"):
            params.append('$."' + key.replace('"', '""') + '"')
        clauses.append(f" AND {column} IN ({','.join('?' * len(values))})")
        params += [str(v) for v in values]
    return "".join(clauses), params
