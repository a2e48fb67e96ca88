"""The fast encoder: tiktoken's Rust BPE driven by the learned ranks.

tiktoken merges by the rank of the concatenated bytes and returns ranks as ids. Ranks are
therefore laid out in merge order (bytes, then each merge's result); when a vocabulary's ids
follow another order (imported files), a lookup table maps ranks back to ids.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken

CPUS = os.cpu_count() or 1


class FastEncoder:
    def __init__(
        self,
        pattern: str,
        vocab: list[bytes],
        byte_ids: list[int],
        merges: dict[tuple[int, int], int],
        mergeable: list[int],
    ) -> None:
        order: list[int] = list(byte_ids)
        seen = set(order)
        for new_id in merges.values():
            if new_id not in seen:
                order.append(new_id)
                seen.add(new_id)
        order.extend(i for i in mergeable if i not in seen)
        self.rank_to_id = None if order == list(range(len(order))) else np.asarray(order, dtype=np.int64)
        ranks = {vocab[token_id]: rank for rank, token_id in enumerate(order)}
        self.encoding = tiktoken.Encoding(
            name="slmkit", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )

    def _ids(self, ranks: list[int]) -> list[int]:
        return ranks if self.rank_to_id is None else self.rank_to_id[ranks].tolist()

    def encode_ordinary(self, text: str) -> list[int]:
        return self._ids(self.encoding.encode_ordinary(text))

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """One contiguous slice of `texts` per thread: per-text tasks would cost more than the
        encoding of short texts. tiktoken releases the GIL, so the slices run in parallel."""
        threads = max(1, min(num_threads or CPUS, len(texts)))
        if threads == 1:
            return [self.encode_ordinary(t) for t in texts]
        step = -(-len(texts) // threads)
        slices = [texts[i : i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(threads) as pool:
            return [ids for part in pool.map(lambda part: [self.encode_ordinary(t) for t in part], slices) for ids in part]
