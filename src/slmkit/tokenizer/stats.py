"""How well a tokenizer fits a corpus: compression, word splitting and vocabulary use."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from slmkit.errors import InputError
from slmkit.tokenizer.tokenizer import Tokenizer


@dataclass
class TokenizerStats:
    documents: int
    bytes: int
    words: int
    tokens: int
    vocab_size: int
    vocab_used: int
    top: list[tuple[int, str, int]] = field(default_factory=list)  # (id, piece, count)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)

    @property
    def vocab_share(self) -> float:
        return self.vocab_used / self.vocab_size

    def table(self) -> str:
        rows = [
            ("documents", f"{self.documents:,}"),
            ("bytes", f"{self.bytes:,}"),
            ("tokens", f"{self.tokens:,}"),
            ("bytes/token", f"{self.bytes_per_token:.3f}"),
            ("tokens/word", f"{self.tokens_per_word:.3f}"),
            ("vocab used", f"{self.vocab_used:,} of {self.vocab_size:,} ({self.vocab_share:.1%})"),
        ]
        lines = [f"{k:<12} {v}" for k, v in rows]
        lines.append("top tokens:")
        lines += [f"  {count:>10,}  {tid:>6}  {piece!r}" for tid, piece, count in self.top]
        return "\n".join(lines)


def tokenizer_stats(tok: Tokenizer, texts: Iterable[str], top: int = 20, batch: int = 256, progress: bool = False) -> TokenizerStats:
    """Encode `texts` (ordinary text, as the data pipeline does) and measure the result."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    documents = n_bytes = words = 0
    buffer: list[str] = []

    def flush() -> None:
        if buffer:
            ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in tok.encode_ordinary_batch(buffer)])
            counts[:] += np.bincount(ids, minlength=tok.vocab_size)
            buffer.clear()

    for text in tqdm(texts, desc="encoding", unit="doc", disable=not progress):
        documents += 1
        n_bytes += len(text.encode("utf-8", "replace"))
        words += len(text.split())
        buffer.append(text)
        if len(buffer) >= batch:
            flush()
    flush()
    tokens = int(counts.sum())
    if tokens == 0:
        raise InputError("no text to measure: the corpus is empty")
    order = np.argsort(-counts, kind="stable")[:top]
    return TokenizerStats(
        documents=documents,
        bytes=n_bytes,
        words=words,
        tokens=tokens,
        vocab_size=tok.vocab_size,
        vocab_used=int((counts > 0).sum()),
        top=[(int(i), tok.token_piece(int(i)), int(counts[i])) for i in order if counts[i] > 0],
    )
