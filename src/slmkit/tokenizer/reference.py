"""The reference byte-level BPE encoder: plain Python, written to be read.

Encoding a chunk starts from its bytes and repeatedly merges the adjacent pair that was
learned earliest (lowest rank), exactly as training applied the merges. The fast path
(`fast.py`, tiktoken) must return the same ids for every input; a test holds them equal.
"""

from __future__ import annotations

import itertools

from slmkit.tokenizer.pretokenize import compiled


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ReferenceEncoder:
    """Regex split, then rank-ordered merges inside each chunk."""

    def __init__(
        self,
        pattern: str,
        byte_ids: list[int],
        merges: dict[tuple[int, int], int],
        token_ids: dict[bytes, int],
        ignore_merges: bool = False,
    ) -> None:
        self.split = compiled(pattern)
        self.byte_ids = byte_ids  # byte value -> token id
        self.merges = merges  # (left id, right id) -> merged id, in rank order
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.token_ids = token_ids  # token bytes -> id (for ignore_merges)
        self.ignore_merges = ignore_merges

    def encode_chunk(self, chunk: bytes) -> list[int]:
        if self.ignore_merges and chunk in self.token_ids:
            return [self.token_ids[chunk]]
        ids = [self.byte_ids[b] for b in chunk]
        while len(ids) >= 2:
            pair = min(itertools.pairwise(ids), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, self.merges[pair])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self.split.findall(text):
            ids.extend(self.encode_chunk(chunk.encode("utf-8")))
        return ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]
