"""Token shards: a cleaned corpus, tokenized into fixed-size `.npy` files for pretraining.

    out/
      train_000000.npy ...   token ids, end-of-text after every document, uint16 (or uint32)
      val_000000.npy ...     the same for the validation documents
      manifest.json          tokenizer, dtype, counts, sources, cleaning parameters and report
      tokenizer.json ...     a copy of the tokenizer, so that training finds it wherever its source lives

The corpus is streamed: documents are cleaned one at a time, tokenized in batches of about a
megabyte, and appended to one shard buffer per split that is written out whenever it fills.
Each document goes to train or val by a seeded hash of its content, so the split does not depend
on the order or the parallelism of processing; same inputs and seed give byte-identical output.
A document longer than `max_doc_chars` (a book, a log file, a corpus that is one long text) is
first cut into pieces at paragraph or line breaks, each a document of its own, so that it too
is spread over both splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from tqdm.auto import tqdm

from slmkit import __version__
from slmkit._io import atomic_dir, write_json
from slmkit.data.clean import CleanConfig, Cleaner, CleanReport, content_key
from slmkit.data.corpus import Corpus, PathLike, batched_by_chars
from slmkit.errors import InputError

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
FORMAT = "slmkit-token-shards"
SHARD_TOKENS = 100_000_000  # as nanoGPT's FineWeb shards: 200 MB of uint16 per file
_BATCH_CHARS = 1 << 20  # text handed to the batch encoder at once
# About 2,500 tokens of English: a few training windows of a small model per piece, and ~100
# pieces from a 1 MB book, enough for a 5% validation split.
MAX_DOC_CHARS = 10_000


class BatchTokenizer(Protocol):
    """What `prepare` needs from a tokenizer (`slmkit.tokenizer.Tokenizer` has it)."""

    vocab_size: int
    eot_id: int

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]: ...

    def fingerprint(self) -> str: ...

    def save(self, directory: Path) -> Path: ...


@dataclass
class SplitStats:
    documents: int = 0  # each piece of a cut document counts as one
    tokens: int = 0  # end-of-text tokens included
    text_bytes: int = 0  # UTF-8 bytes of the documents, for bytes per token
    shards: list[int] = field(default_factory=list)  # tokens in each shard file

    @property
    def bytes_per_token(self) -> float:
        """Compression of the tokenizer on this split (end-of-text tokens not counted)."""
        text_tokens = self.tokens - self.documents
        return self.text_bytes / text_tokens if text_tokens else 0.0


@dataclass
class CutReport:
    """The documents longer than `max_chars` and the pieces they were cut into."""

    max_chars: int | None
    documents: int = 0
    pieces: int = 0

    def to_dict(self) -> dict:
        return {"max_chars": self.max_chars, "documents": self.documents, "pieces": self.pieces}


@dataclass
class PrepareResult:
    out: Path
    dtype: str
    splits: dict[str, SplitStats]
    cleaning: CleanReport
    cut: CutReport
    manifest: dict

    def summary_table(self) -> str:
        """The cleaning steps and the splits as a plain-text table, for the terminal or a report."""
        steps = [["cleaning step", "docs removed", "chars removed", "docs modified"]]
        for name, s in self.cleaning.steps.items():
            steps.append([name, f"{s.documents:,}", f"{s.chars:,}", f"{s.modified:,}"])
        steps.append(["kept", f"{self.cleaning.documents_out:,} of {self.cleaning.documents_in:,}",
                      f"{self.cleaning.chars_out:,} chars", ""])
        splits = [["split", "documents", "tokens", "shards", "bytes/token"]]
        for name, s in self.splits.items():
            splits.append([name, f"{s.documents:,}", f"{s.tokens:,}", f"{len(s.shards)}", f"{s.bytes_per_token:.2f}"])
        sources = self.manifest["sources"]
        read = f"sources: {len(sources)} file(s), {sum(f['bytes'] for f in sources):,} bytes"
        if skipped := len(self.manifest["skipped_files"]):
            read += f"; {skipped} file(s) of unknown type skipped"
        if self.cut.max_chars is None:
            read += "\nlong documents: not cut"
        else:
            read += (f"\nlong documents: {self.cut.documents:,} over {self.cut.max_chars:,} chars, "
                     f"cut into {self.cut.pieces:,} pieces")
        return f"{read}\n\n{_table(steps)}\n\n{_table(splits)}\n\n{self.dtype} shards in {self.out}"


def prepare(
    paths: PathLike | Iterable[PathLike],
    tokenizer: BatchTokenizer,
    out: PathLike,
    *,
    val_fraction: float = 0.05,
    max_doc_chars: int | None = MAX_DOC_CHARS,
    dedup: str = "exact",
    min_chars: int = CleanConfig.min_chars,
    max_nonalnum_ratio: float | None = CleanConfig.max_nonalnum_ratio,
    max_repeated_line_ratio: float | None = CleanConfig.max_repeated_line_ratio,
    near_threshold: float = CleanConfig.near_threshold,
    seed: int = 0,
    errors: str = "strict",
    text_field: str = "text",
    skip_unreadable: bool = False,
    force: bool = False,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
) -> PrepareResult:
    """Read, clean, split and tokenize a corpus into token shards under `out` (see module doc).

    `max_doc_chars` None never cuts a document. Nothing is written unless everything succeeds;
    an existing `out` is replaced only with `force`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if max_doc_chars is not None and max_doc_chars < 1:
        raise InputError(f"max_doc_chars must be positive (or None to never cut), not {max_doc_chars}")
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be positive, not {shard_tokens}")
    config = CleanConfig(
        dedup=dedup,
        min_chars=min_chars,
        max_nonalnum_ratio=max_nonalnum_ratio,
        max_repeated_line_ratio=max_repeated_line_ratio,
        near_threshold=near_threshold,
    )
    corpus = Corpus(paths, text_field=text_field, errors=errors, skip_unreadable=skip_unreadable)
    cleaner = Cleaner(config)
    cut = CutReport(max_doc_chars)
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.eot_id
    splits = {name: SplitStats() for name in SPLITS}

    with atomic_dir(out, force) as tmp:
        writers = {name: ShardWriter(tmp, name, dtype, shard_tokens) for name in SPLITS}
        with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
            for batch in batched_by_chars(cut_long_documents(cleaner(corpus), cut), _BATCH_CHARS):
                tokens: dict[str, list[int]] = {name: [] for name in SPLITS}
                for text, ids in zip(batch, tokenizer.encode_ordinary_batch(batch)):
                    name = split_of(text, seed, val_fraction)
                    tokens[name].extend(ids)
                    tokens[name].append(eot)
                    splits[name].documents += 1
                    splits[name].text_bytes += len(text.encode("utf-8"))
                for name, ids in tokens.items():
                    writers[name].write(ids)
                    splits[name].tokens += len(ids)
                bar.update(len(batch))
                bar.set_postfix(tokens=f"{sum(s.tokens for s in splits.values()):,}")
        if cleaner.report.documents_out == 0:
            removed = ", ".join(f"{name} {s.documents}" for name, s in cleaner.report.steps.items() if s.documents)
            raise InputError(f"cleaning removed all {cleaner.report.documents_in} documents ({removed}); loosen the filters")
        for name, writer in writers.items():
            splits[name].shards = writer.close()

        manifest = {
            "format": FORMAT,
            "slmkit_version": __version__,
            "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "eot_id": eot},
            "dtype": dtype.name,
            "shard_tokens": shard_tokens,
            "seed": seed,
            "val_fraction": val_fraction,
            "long_documents": cut.to_dict(),
            "splits": {
                name: {
                    "documents": s.documents,
                    "tokens": s.tokens,
                    "text_bytes": s.text_bytes,
                    "shards": [{"file": shard_name(name, i), "tokens": n} for i, n in enumerate(s.shards)],
                }
                for name, s in splits.items()
            },
            "sources": [f.to_dict() for f in corpus.files],
            "skipped_files": [p.as_posix() for p in corpus.skipped],
            "unreadable_skipped": [p.as_posix() for p in corpus.unreadable],
            "read": {"text_field": text_field, "errors": errors},
            "filters": config.to_dict(),
            "cleaning": cleaner.report.to_dict(),
        }
        write_json(tmp / MANIFEST, manifest)
        tokenizer.save(tmp)
    return PrepareResult(Path(out), dtype.name, splits, cleaner.report, cut, manifest)


class ShardWriter:
    """Token ids of one split -> `{split}_000000.npy`, ... of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype = out, split, dtype
        self.buffer = np.empty(shard_tokens, dtype=dtype)  # untouched pages cost no memory
        self.fill = 0
        self.shards: list[int] = []

    def write(self, ids: list[int]) -> None:
        tokens = np.asarray(ids, dtype=self.dtype)
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == len(self.buffer):
                self._flush()

    def close(self) -> list[int]:
        """Write the partial last shard; return the token count of every shard."""
        self._flush()
        return self.shards

    def _flush(self) -> None:
        if self.fill:
            np.save(self.out / shard_name(self.split, len(self.shards)), self.buffer[: self.fill])
            self.shards.append(self.fill)
            self.fill = 0


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cut_long_documents(texts: Iterable[str], report: CutReport) -> Iterator[str]:
    """`texts` with every one longer than `report.max_chars` replaced by its pieces, counted in `report`."""
    for text in texts:
        if report.max_chars is None or len(text) <= report.max_chars:
            yield text
            continue
        pieces = cut_document(text, report.max_chars)
        report.documents += 1
        report.pieces += len(pieces)
        yield from pieces


def cut_document(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars` that concatenate back to it.

    Each piece ends after the last paragraph break (blank line) in the second half of its span,
    else after the last line break there, else at exactly `max_chars`: pieces stay near the limit,
    and the cut depends on the text alone.
    """
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        for sep in ("\n\n", "\n"):
            at = text.rfind(sep, start + max_chars // 2, end)
            if at >= 0:
                end = at + len(sep)
                break
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """'val' for about `val_fraction` of documents, chosen by a seeded hash of the content alone.

    The hash is of the dedup key (case and whitespace ignored), so copies that differ only in
    those land in the same split even when dedup is off.
    """
    digest = hashlib.blake2b(f"{seed}:".encode() + content_key(text), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def read_manifest(directory: PathLike) -> dict:
    """The manifest of a shards directory written by `prepare`."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(f"{directory} is not a token shards directory (no {MANIFEST}); create one with prepare")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a {FORMAT} manifest; create the directory with prepare")
    return manifest


def load_shards(directory: PathLike, split: str = "train") -> list[np.memmap]:
    """The shards of one split, memory-mapped read-only, in order."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise InputError(f"no split {split!r} in {directory}; choose one of {', '.join(manifest['splits'])}")
    files = [Path(directory) / s["file"] for s in manifest["splits"][split]["shards"]]
    if not files:
        raise InputError(f"split {split!r} of {directory} has no tokens; prepare it with a larger corpus or val_fraction")
    return [np.load(f, mmap_mode="r") for f in files]



def _table(rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
