"""Labelled and instruction records from CSV, TSV, JSONL or JSON-list files.

Every record is a dict of field -> string, tagged with where it came from, so a bad one is
reported as `file:line: what is wrong`. With `skip_bad=True` bad records are counted and skipped
instead. CSV/TSV files may have a header row or not: without one, fields are named by column
number ("0", "1", ...), e.g. `--text-field 1 --label-field 0` for the SMS spam collection.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmkit.errors import InputError

FORMATS = ("csv", "tsv", "jsonl", "json")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


class BadRecord(InputError):
    """A record that cannot be used; the message starts with `file:line:`."""


@dataclass
class Records:
    """Records read from one file, and how many bad ones were skipped."""

    items: list[dict[str, Any]]
    skipped: int = 0
    path: str = ""
    errors: list[str] = field(default_factory=list)  # the first few skip reasons, for the log

    def __len__(self) -> int:
        return len(self.items)


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"unknown record format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise InputError(f"cannot tell the format of {path} from its name; pass --format {'|'.join(FORMATS)}")
    return found


def read_records(
    path: str | os.PathLike,
    required: Sequence[str] = (),
    *,
    fmt: str | None = None,
    header: bool | None = None,
    skip_bad: bool = False,
) -> Records:
    """Read every record of `path` that has the `required` fields (non-empty strings).

    `header=None` decides by the first row of a CSV/TSV file: it is a header when it holds every
    required field name that is not a column number.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    fmt = detect_format(path, fmt)
    rows = _json_rows(path, fmt) if fmt in ("json", "jsonl") else _table_rows(path, fmt, required, header)
    out = Records([], path=str(path))
    for where, row in rows:
        try:
            if isinstance(row, BadRecord):
                raise row
            out.items.append(_check(where, row, required))
        except BadRecord as e:
            if not skip_bad:
                raise InputError(f"{e} (pass --skip-bad to skip bad records)") from None
            out.skipped += 1
            if len(out.errors) < 5:
                out.errors.append(str(e))
    if not out.items:
        raise InputError(f"{path} holds no usable records" + (f" ({out.skipped} bad ones skipped)" if out.skipped else ""))
    return out


def _check(where: str, row: Any, required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected an object of fields, got {type(row).__name__}")
    for name in required:
        if name not in row:
            raise BadRecord(f"{where}: missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
        value = row[name]
        if not isinstance(value, (str, list)) or not value:
            raise BadRecord(f"{where}: field {name!r} is empty or not text")
    return {**row, "_source": where}


def _json_rows(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", BadRecord(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: a .json data file must hold a list of records, not a {type(data).__name__}")
    lines = _record_lines(text, len(data))
    for i, row in enumerate(data):
        yield f"{path}:{lines[i]}", row


def _record_lines(text: str, n: int) -> list[int]:
    """Line where each top-level object of a JSON list starts (for error messages)."""
    lines, depth, line, in_string, escaped = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        elif in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
            continue
        elif ch == '"':
            in_string, escaped = True, False
        elif ch in "[{":
            if depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return (lines + [line] * n)[:n]


def _table_rows(path: Path, fmt: str, required: Sequence[str], header: bool | None) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    delimiter = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL  # TSV text may hold bare quotes
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    first = next(reader, None)
    if first is None:
        return
    named = [f for f in required if not f.isdigit()]
    if header is None:
        header = bool(named) and all(f in first for f in named)
        if named and not header:
            raise InputError(f"{path} has no column named {', '.join(repr(f) for f in named if f not in first)}; "
                             f"its first row is {first[:6]}; name columns by number (0, 1, ...) for a file without a header")
    columns = first if header else [str(i) for i in range(len(first))]
    if header:
        for f in required:
            if f not in columns:
                raise InputError(f"{path} has no column {f!r}; columns: {', '.join(columns)}")
    else:
        reader = _chain(first, reader)
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            yield where, BadRecord(f"{where}: expected {len(columns)} columns, got {len(row)}")
            continue
        yield where, dict(zip(columns, row))


class _chain:
    """A csv reader with its first row pushed back, keeping `line_num` right."""

    def __init__(self, first: list[str], reader) -> None:
        self.first, self.reader = first, reader

    @property
    def line_num(self) -> int:
        return 1 if self.first is not None else self.reader.line_num

    def __iter__(self):
        return self

    def __next__(self) -> list[str]:
        if self.first is not None:
            row, self.first = self.first, None
            return row
        return next(self.reader)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None


def split_records(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic (seeded) split into (rest, held-out `fraction`)."""
    import random

    if not 0 < fraction < 1:
        raise InputError(f"split fraction must be between 0 and 1, not {fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(items) * fraction))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
