"""Reading a corpus: files and directories -> a stream of documents (strings).

Plain-text files (.txt .md .rst .py) are one document each. JSONL files hold one document per
line (a text field) and CSV/TSV files one per row (a column); those are streamed line by line,
so a corpus of any size is read in constant memory. Everything is UTF-8.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from slmkit.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv")
ERRORS = ("strict", "replace")
_SNIFF_BYTES = 8192  # binary files are recognized by a NUL byte in their first 8 KiB

PathLike = str | os.PathLike


@dataclass
class SourceFile:
    """One file of the corpus; `documents` is filled in as the file is read."""

    path: Path
    bytes: int
    documents: int = 0

    def to_dict(self) -> dict:
        return {"path": self.path.as_posix(), "bytes": self.bytes, "documents": self.documents}


@dataclass
class Document:
    """One document with where it came from: its file and, for a .jsonl/.csv/.tsv record, the
    record's first line and its other fields (retrieval keeps them as metadata)."""

    text: str
    path: Path
    line: int | None = None
    fields: dict[str, Any] | None = None


class Corpus:
    """The documents under `paths`, in a fixed order: paths as given, a directory's files sorted by path.

    Inside a directory, hidden entries are ignored and files of unknown type are skipped (listed
    in `skipped`); a file named explicitly is read as plain text whatever its extension. A file or
    folder that cannot be read is an error, or with `skip_unreadable` is listed in `unreadable`.
    Iterating reads the files again each time; nothing but the current file or line is held.
    """

    def __init__(self, paths: PathLike | Iterable[PathLike], *, text_field: str = "text", errors: str = "strict",
                 skip_unreadable: bool = False) -> None:
        if errors not in ERRORS:
            raise InputError(f"errors must be one of {', '.join(ERRORS)}, not {errors!r}")
        self.paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        self.text_field = text_field
        self.errors = errors
        self.skip_unreadable = skip_unreadable
        self.files: list[SourceFile] = []
        self.skipped: list[Path] = []
        self.unreadable: list[Path] = []
        for path in self.paths:
            self._add(path)

    def _add(self, path: Path) -> None:
        try:
            path.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"input {path} is a loop of symbolic links; point it at a file or directory") from None
            if e.errno == errno.ENOENT and path.is_symlink():
                raise InputError(f"input {path} is a broken symbolic link (to {os.readlink(path)})") from None
            if e.errno != errno.ENOENT:
                raise InputError(f"cannot read input {path}: {e.strerror.lower()}") from None
        if path.is_file():
            self._add_file(path)
        elif path.is_dir():
            found = []
            for root, dirs, names in os.walk(path, onerror=lambda e: self._unreadable(Path(e.filename), e)):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, name) for name in names if not name.startswith(".")]
            for file in sorted(found, key=lambda f: f.relative_to(path).parts):
                if file.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES:
                    self._add_file(file)
                else:
                    self.skipped.append(file)
        else:
            raise InputError(f"input {path} does not exist; pass files or directories of text")

    def _add_file(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            return self._unreadable(path, e)
        self.files.append(SourceFile(path, size))

    def _unreadable(self, path: Path, e: OSError) -> None:
        if not self.skip_unreadable:
            raise InputError(f"cannot read {path}: {e.strerror.lower()}; fix its permissions or skip what cannot be "
                             "read with --skip-unreadable (skip_unreadable=True)") from None
        self.unreadable.append(path)

    def __iter__(self) -> Iterator[str]:
        for document in self.documents():
            yield document.text

    def documents(self) -> Iterator[Document]:
        """The documents with their sources, in the same order as iterating the corpus."""
        total = 0
        for source in self.files:
            source.documents = 0
            for document in read_documents(source.path, text_field=self.text_field, errors=self.errors):
                source.documents += 1
                yield document
            total += source.documents
        if total == 0:
            where = ", ".join(str(p) for p in self.paths)
            raise InputError(
                f"no documents found in {where}; give .txt/.md/.rst/.py, .jsonl or .csv/.tsv files with text"
            )


def iter_texts(paths: PathLike | Iterable[PathLike], *, text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The documents under `paths` as plain strings (for the tokenizer trainer)."""
    yield from Corpus(paths, text_field=text_field, errors=errors)


def read_file(path: Path, *, text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The non-empty documents of one file, chosen by its extension (unknown -> plain text)."""
    for document in read_documents(path, text_field=text_field, errors=errors):
        yield document.text


def read_documents(path: Path, *, text_field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """`read_file` with each document's source line and other record fields."""
    suffix = path.suffix.lower()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror.lower()}") from None
    with f:
        _check_not_binary(f, path)
        if suffix == ".jsonl":
            yield from _read_jsonl(_lines(f, path, errors), path, text_field)
        elif suffix in (".csv", ".tsv"):
            yield from _read_csv(_lines(f, path, errors), path, text_field, "\t" if suffix == ".tsv" else ",")
        else:
            text = _decode(f.read(), path, errors, offset=0)
            if text:
                yield Document(text, path)


def _check_not_binary(f: BinaryIO, path: Path) -> None:
    if b"\0" in f.read(_SNIFF_BYTES):
        raise InputError(f"{path} looks binary (it contains NUL bytes); pass text files only")
    f.seek(0)


def _decode(data: bytes, path: Path, errors: str, offset: int) -> str:
    """UTF-8 bytes -> str; a leading byte-order mark is dropped (`offset` 0 is the file start)."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8", errors)
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} is not valid UTF-8 (byte offset {offset + e.start}); "
            "convert it to UTF-8 or pass errors='replace' (--errors replace)"
        ) from None


def _lines(f: BinaryIO, path: Path, errors: str) -> Iterator[str]:
    """Decoded lines with their line endings, so that csv sees quoted newlines intact."""
    offset = 0
    for raw in f:
        yield _decode(raw, path, errors, offset)
        offset += len(raw)


def _read_jsonl(lines: Iterator[str], path: Path, field: str) -> Iterator[Document]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict) or field not in record:
            raise InputError(f"{path}:{lineno}: no {field!r} field; choose the text field with text_field= (--text-field)")
        text = record[field]
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        if text:
            yield Document(text, path, lineno, {k: v for k, v in record.items() if k != field})


def _read_csv(lines: Iterator[str], path: Path, column: str, delimiter: str) -> Iterator[Document]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # documents can be longer than csv's 128 KiB default
    reader = csv.DictReader(lines, delimiter=delimiter)
    try:
        if reader.fieldnames is None:
            return
        if column not in reader.fieldnames:
            raise InputError(
                f"{path} has no column {column!r} (columns: {', '.join(reader.fieldnames)}); "
                "choose one with text_field= (--text-field)"
            )
        line = reader.line_num + 1
        for row in reader:
            if row[column]:
                yield Document(row[column], path, line, {k: v for k, v in row.items() if k != column})
            line = reader.line_num + 1
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def batched_by_chars(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    """Group texts into lists of about `batch_chars` characters (a text is never split), so that
    batch work (encoding, counting) gets large units without holding the corpus."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
