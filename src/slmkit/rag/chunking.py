"""Documents -> chunks: character spans sized in the answering model's tokens, with headings.

Three ways to cut: `tokens` (windows of `size` tokens that overlap by `overlap`, cut before a
word where one is near), `sentences` (whole sentences packed up to `size` tokens; the next chunk
repeats up to `overlap` tokens of trailing sentences) and `semantic` (sentences grouped where
their embeddings stay similar, a new chunk where the similarity of neighbours drops below the
document's lower quartile, never more than `size` tokens). A chunk is a span [start, end) of the
document's text, so a citation can point back into the document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from slmkit.errors import InputError
from slmkit.tokenizer import Tokenizer

METHODS = ("tokens", "sentences", "semantic")
Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class ChunkConfig:
    method: str = "tokens"
    size: int = 256
    overlap: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown chunking {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.size < 8:
            raise InputError(f"chunk size must be at least 8 tokens, not {self.size}")
        if not 0 <= self.overlap < self.size:
            raise InputError(f"chunk overlap must be at least 0 and less than the chunk size ({self.size}), not {self.overlap}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Span:
    """A chunk: text[start:end], its size in tokens and the heading path it falls under."""

    start: int
    end: int
    tokens: int
    heading: str


def chunk_text(text: str, tokenizer: Tokenizer, config: ChunkConfig, *, headings: bool = True,
               embed: Embed | None = None) -> list[Span]:
    """The chunks of one document (`headings` False for source code, whose `#` lines are comments)."""
    starts = token_starts(text, tokenizer)
    if config.method == "tokens":
        cuts = _token_windows(text, starts, 0, len(starts) - 1, config.size, config.overlap)
    else:
        sentences = _sentence_tokens(sentence_spans(text), starts)
        if config.method == "sentences":
            cuts = _pack(text, starts, sentences, config.size, config.overlap, breaks=set())
        else:
            if embed is None:
                raise InputError("semantic chunking needs an embedder")
            cuts = _pack(text, starts, sentences, config.size, 0, breaks=_topic_breaks(text, starts, sentences, embed))
    outline = heading_outline(text) if headings else []
    spans = []
    for first, last in cuts:  # token ranges -> trimmed character spans
        start, end = _trim(text, starts[first], starts[last])
        if start < end:
            spans.append(Span(start, end, last - first, heading_at(outline, start)))
    return spans


# ---------------------------------------------------------------------------- token positions
def token_starts(text: str, tokenizer: Tokenizer) -> list[int]:
    """Character offset where each token of `text` starts, then len(text). Byte-level tokenizers
    decode to exactly the text's bytes; a boundary inside a multi-byte character moves past it.
    A tokenizer that normalizes (the byte counts differ) is counted word by word instead."""
    ids = tokenizer.encode_ordinary(text)
    data = text.encode("utf-8")
    lengths = np.fromiter((len(b) for b in map(tokenizer.decode_bytes, ([i] for i in ids))), np.int64, len(ids))
    if int(lengths.sum()) != len(data):
        return _word_token_starts(text, tokenizer)
    byte_starts = np.concatenate([[0], np.cumsum(lengths)])
    is_char_start = (np.frombuffer(data, np.uint8) & 0xC0) != 0x80
    chars_before = np.concatenate([[0], np.cumsum(is_char_start)])  # chars_before[b]: characters starting before byte b
    return chars_before[byte_starts].tolist()


def _word_token_starts(text: str, tokenizer: Tokenizer) -> list[int]:
    words = [m.span() for m in re.finditer(r"\s*\S+|\s+$", text)]
    counts = [len(ids) for ids in tokenizer.encode_ordinary_batch([text[a:b] for a, b in words])]
    starts = [a + round(i * (b - a) / n) for (a, b), n in zip(words, counts) for i in range(n)]
    return starts + [len(text)]


def _token_windows(text: str, starts: Sequence[int], first: int, last: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows over tokens [first, last) of at most `size`; each ends before a word when one
    starts in its last quarter."""
    windows, i = [], first
    while i < last:
        j = min(i + size, last)
        if j < last:
            j = next((c for c in range(j, i + size * 3 // 4, -1) if _word_start(text, starts[c])), j)
        windows.append((i, j))
        if j == last:
            break
        i = max(j - overlap, i + 1)
    return windows


def _word_start(text: str, offset: int) -> bool:
    return 0 < offset < len(text) and (text[offset].isspace() or text[offset - 1].isspace())


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


# ---------------------------------------------------------------------------- sentences
_SENTENCE_END = re.compile(r"""[.!?]['")\]]*(?=\s)|\n[ \t]*\n|\n(?=[ \t]*[-*+#=~^]|[ \t]*\d+\.)""")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence: ends at . ! ? before whitespace, at blank lines, and before
    list items and heading lines (so a title is not glued to the text under it)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        a, b = _trim(text, start, m.end())
        if a < b:
            spans.append((a, b))
        start = m.end()
    a, b = _trim(text, start, len(text))
    if a < b:
        spans.append((a, b))
    return spans


def _sentence_tokens(sentences: list[tuple[int, int]], starts: Sequence[int]) -> list[tuple[int, int]]:
    """Sentences as token ranges [first, last) that tile the document's tokens: a sentence starts
    with the token its first character is in (" The" starts the sentence "The ...")."""
    bounds = np.searchsorted(np.asarray(starts), [a for a, _ in sentences], side="right") - 1
    firsts = [0] + bounds[1:].tolist()
    lasts = firsts[1:] + [len(starts) - 1]
    return [(a, b) for a, b in zip(firsts, lasts) if b > a]


def _pack(text: str, starts: Sequence[int], sentences: list[tuple[int, int]], size: int, overlap: int,
          breaks: set[int]) -> list[tuple[int, int]]:
    """Whole sentences (token ranges) packed into chunks of at most `size` tokens; a new chunk also
    starts at every sentence index in `breaks`; a sentence longer than `size` is cut by tokens."""
    chunks: list[tuple[int, int]] = []
    current: list[tuple[int, int]] = []
    for index, (a, b) in enumerate(sentences):
        if b - a > size:
            if current:
                chunks.append((current[0][0], current[-1][1]))
            chunks += _token_windows(text, starts, a, b, size, overlap)
            current = []
            continue
        if current and (b - current[0][0] > size or index in breaks):
            chunks.append((current[0][0], current[-1][1]))
            kept: list[tuple[int, int]] = []
            for s in reversed(current):  # trailing sentences that fit the overlap (and leave room)
                if current[-1][1] - s[0] > overlap or b - s[0] > size:
                    break
                kept.insert(0, s)
            current = kept
        current.append((a, b))
    if current:
        chunks.append((current[0][0], current[-1][1]))
    return chunks


def _topic_breaks(text: str, starts: Sequence[int], sentences: list[tuple[int, int]], embed: Embed) -> set[int]:
    """Indices of sentences that start a new topic: their similarity to the previous sentence is in
    the document's lowest quarter."""
    if len(sentences) < 3:
        return set()
    vectors = embed([text[starts[a]:starts[b]] for a, b in sentences])
    similarity = np.sum(vectors[1:] * vectors[:-1], axis=1)
    threshold = np.percentile(similarity, 25)
    return {i + 1 for i, s in enumerate(similarity) if s < threshold}


# ---------------------------------------------------------------------------- headings
_ATX = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_FENCE = re.compile(r"^(```|~~~)", re.M)
_ADORNMENT = re.compile(r"""^([=\-~^"'`+#*:._])\1{2,}[ \t]*$""")


def heading_outline(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of each Markdown (#) and reStructuredText (underlined) heading."""
    found: list[tuple[int, tuple, str]] = []
    fenced = [m.start() for m in _FENCE.finditer(text)]
    for m in _ATX.finditer(text):
        if sum(1 for f in fenced if f < m.start()) % 2 == 0:
            found.append((m.start(), ("#", len(m.group(1))), m.group(2).strip()))
    lines = text.split("\n")
    offset, offsets = 0, []
    for line in lines:
        offsets.append(offset)
        offset += len(line) + 1
    for i in range(1, len(lines)):
        title, under = lines[i - 1].strip(), lines[i].rstrip()
        m = _ADORNMENT.match(under)
        if not m or not title or _ADORNMENT.match(title) or len(under) < len(title) or lines[i - 1][:1].isspace():
            continue
        over = i >= 2 and lines[i - 2].rstrip() == under
        found.append((offsets[i - 2 if over else i - 1], ("rst", m.group(1), over), title))
    found.sort()
    rst_styles: list[tuple] = []
    outline = []
    for offset, style, title in found:
        if style[0] == "#":
            level = style[1]
        else:
            if style not in rst_styles:
                rst_styles.append(style)
            level = rst_styles.index(style) + 1
        outline.append((offset, level, title))
    return outline


def heading_at(outline: list[tuple[int, int, str]], offset: int) -> str:
    """The heading path ("Title > Section") in force at `offset`."""
    path: list[tuple[int, str]] = []
    for at, level, title in outline:
        if at > offset:
            break
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
    return " > ".join(title for _, title in path)
