"""Cleaning a stream of documents: normalize, filter, deduplicate, and count what each step removed.

Steps run in this order, each a function `text -> text | None` (None drops the document):

    nfc                      Unicode NFC normalization (composed and decomposed forms become one)
    control_chars            strip C0/C1 control characters except \\n \\t \\r
    min_chars                drop documents shorter than `min_chars` (surrounding whitespace excluded)
    max_nonalnum_ratio       drop documents whose non-space characters are mostly symbols
    max_repeated_line_ratio  drop documents made of the same lines over and over (boilerplate, logs)
    exact_dedup              drop documents equal to an earlier one up to case and whitespace
    near_dedup               drop documents whose MinHash Jaccard estimate with an earlier one
                             is >= `near_threshold` (word 5-gram shingles, LSH index)

Dedup is streaming: only a 16-byte hash (exact) or a 128-value MinHash (near) per kept document
is held, never the texts. The first occurrence of a document is the one kept.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

from slmkit.errors import InputError, MissingExtraError

DEDUP_MODES = ("none", "exact", "near")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SYMBOL = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s")
_SHINGLE_WORDS = 5
_NUM_PERM = 128
_MINHASH_SEED = 1  # fixed: which documents are near-duplicates must not depend on the split seed

Step = Callable[[str], "str | None"]


@dataclass(frozen=True)
class CleanConfig:
    """What cleaning does. The defaults only remove junk, so that any domain (prose, code, SMILES,
    short messages) survives them; web-scraped text usually wants stricter values, e.g.
    min_chars=200, max_nonalnum_ratio=0.3, max_repeated_line_ratio=0.3 (the Gopher rules)."""

    dedup: str = "exact"
    min_chars: int = 1
    max_nonalnum_ratio: float | None = 0.6
    max_repeated_line_ratio: float | None = 0.6
    near_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP_MODES:
            raise InputError(f"dedup must be one of {', '.join(DEDUP_MODES)}, not {self.dedup!r}")
        if not 0.0 < self.near_threshold <= 0.98:  # above 0.98, 128 permutations give LSH too few bands
            raise InputError(f"near_threshold must be in (0, 0.98], not {self.near_threshold}; use dedup='exact' for copies")
        for name in ("max_nonalnum_ratio", "max_repeated_line_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InputError(f"{name} must be in [0, 1] (or None to disable), not {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepStats:
    """What one step did: documents dropped, characters removed (dropped or stripped), documents changed."""

    documents: int = 0
    chars: int = 0
    modified: int = 0


@dataclass
class CleanReport:
    documents_in: int = 0
    chars_in: int = 0
    documents_out: int = 0
    chars_out: int = 0
    steps: dict[str, StepStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Cleaner:
    """Apply the steps of a `CleanConfig` to a document stream: `for text in cleaner(docs): ...`.

    One cleaner is one dedup scope: documents seen in earlier calls count as seen.
    """

    def __init__(self, config: CleanConfig = CleanConfig()) -> None:
        self.config = config
        self.steps: dict[str, Step] = {"nfc": normalize_nfc, "control_chars": strip_control_chars}
        if config.min_chars > 0:
            self.steps["min_chars"] = lambda t: t if len(t.strip()) >= config.min_chars else None
        if config.max_nonalnum_ratio is not None:
            self.steps["max_nonalnum_ratio"] = lambda t: t if nonalnum_ratio(t) <= config.max_nonalnum_ratio else None
        if config.max_repeated_line_ratio is not None:
            self.steps["max_repeated_line_ratio"] = (
                lambda t: t if repeated_line_ratio(t) <= config.max_repeated_line_ratio else None
            )
        if config.dedup in ("exact", "near"):
            self.steps["exact_dedup"] = ExactDedup()
        if config.dedup == "near":
            self.steps["near_dedup"] = NearDedup(config.near_threshold)
        self.report = CleanReport(steps={name: StepStats() for name in self.steps})

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        report = self.report
        for text in docs:
            report.documents_in += 1
            report.chars_in += len(text)
            for name, step in self.steps.items():
                stats = report.steps[name]
                result = step(text)
                if result is None:
                    stats.documents += 1
                    stats.chars += len(text)
                    break
                if result != text:
                    stats.modified += 1
                    stats.chars += len(text) - len(result)
                text = result
            else:
                report.documents_out += 1
                report.chars_out += len(text)
                yield text


def normalize_nfc(text: str) -> str:
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def strip_control_chars(text: str) -> str:
    return _CONTROL.sub("", text)


def nonalnum_ratio(text: str) -> float:
    """Fraction of the non-whitespace characters that are neither letters, digits nor '_'."""
    visible = len(text) - len(_SPACE.findall(text))
    return len(_SYMBOL.findall(text)) / visible if visible else 0.0


def repeated_line_ratio(text: str) -> float:
    """Fraction of the non-blank lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def content_key(text: str) -> bytes:
    """A 16-byte hash of the text up to case and whitespace: equal keys mean the same document."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Drop documents whose `content_key` was seen before."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> str | None:
        key = content_key(text)
        if key in self.seen:
            return None
        self.seen.add(key)
        return text


class NearDedup:
    """Drop documents that are near-copies of an earlier one (MinHash LSH from `datasketch`).

    LSH finds candidates; a candidate counts only if its estimated Jaccard similarity really is
    >= `threshold`, so the threshold means what it says rather than LSH's S-curve around it.
    """

    def __init__(self, threshold: float = 0.8) -> None:
        try:
            from datasketch import LeanMinHash, MinHash, MinHashLSH
        except ImportError:
            raise MissingExtraError("datasketch", "data") from None
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
        self.signatures: list[LeanMinHash] = []  # 512 bytes per kept document
        # crc32 is 3x faster than the default sha1 and good enough: datasketch mixes each hash
        # (murmur3's finalizer) before permuting it. Copies of `_empty` share its permutations.
        self._empty = MinHash(num_perm=_NUM_PERM, seed=_MINHASH_SEED, hashfunc=zlib.crc32)
        self._lean = LeanMinHash

    def __call__(self, text: str) -> str | None:
        m = self._empty.copy()
        m.update_batch(shingles(text))
        if any(self.signatures[key].jaccard(m) >= self.threshold for key in self.lsh.query(m)):
            return None
        signature = self._lean(m)
        self.lsh.insert(len(self.signatures), signature)
        self.signatures.append(signature)
        return text


def shingles(text: str, n: int = _SHINGLE_WORDS) -> list[bytes]:
    """Word n-grams of the case-folded text; a document shorter than n words is one shingle."""
    words = text.casefold().split()
    return [" ".join(words[i : i + n]).encode("utf-8") for i in range(max(1, len(words) - n + 1))]
