"""PyTorch datasets over token shards: fixed windows for evaluation, random windows for pretraining.

The shards of a split are read as one concatenated token stream (memory-mapped, never loaded
whole). A window of `context_length + 1` tokens gives `inputs = window[:-1]` and
`targets = window[1:]`. Windows may cross document boundaries; the end-of-text token between
documents tells the model where one ends.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from slmkit.data.shards import load_shards
from slmkit.errors import InputError

Shards = str | os.PathLike | np.ndarray | Sequence[np.ndarray]


class TokenStream:
    """Shards seen as one 1-D token array: `len(stream)` and `stream.window(start, length)`."""

    def __init__(self, shards: Shards, split: str = "train") -> None:
        self.source = (shards, split) if isinstance(shards, (str, os.PathLike)) else None
        if self.source:
            self.shards = load_shards(shards, split)
        else:
            self.shards = [shards] if isinstance(shards, np.ndarray) else list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # starts[i]: offset of shard i

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, stitched across shard boundaries."""
        pieces = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[i])
            piece = self.shards[i][offset : offset + length]
            pieces.append(piece)
            start += len(piece)
            length -= len(piece)
            i += 1
        return np.concatenate(pieces).astype(np.int64)

    def check_fits(self, context_length: int) -> None:
        if len(self) < context_length + 1:
            raise InputError(
                f"{len(self)} tokens are too few for one window of context {context_length} "
                "(it needs context + 1); use a shorter context or more data"
            )

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn (macOS, Windows) get a pickled copy: send where the
        # shards are, not the tokens, and map the files again on the other side.
        return {"source": self.source} if self.source else self.__dict__

    def __setstate__(self, state: dict) -> None:
        if "shards" in state:
            self.__dict__.update(state)
        else:
            self.__init__(*state["source"])


def _pair(window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(window)
    return tokens[:-1], tokens[1:]


class SlidingWindowDataset(Dataset):
    """Windows at 0, stride, 2*stride, ... over the token stream; item i is `(inputs, targets)`.

    `stride` defaults to `context_length` (disjoint windows, each token predicted once: the way to
    measure validation loss); a smaller stride overlaps windows so that more tokens get long context.
    `shards` is a directory written by `prepare` (then `split` picks the shards), an array, or a list of arrays.
    """

    def __init__(self, shards: Shards, context_length: int, stride: int | None = None, split: str = "train") -> None:
        stride = context_length if stride is None else stride
        if context_length < 1 or stride < 1:
            raise InputError(f"context_length and stride must be positive, not {context_length} and {stride}")
        self.stream = TokenStream(shards, split)
        self.context_length = context_length
        self.stride = stride
        self.stream.check_fits(context_length)

    def __len__(self) -> int:
        return (len(self.stream) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        index %= len(self)
        return _pair(self.stream.window(index * self.stride, self.context_length + 1))


class RandomWindowSampler(IterableDataset):
    """Windows at uniformly random positions, reproducible from `seed`: the pretraining feed.

    `get_batch(B)` returns `(x, y)` of shape [B, T] like nanoGPT's get_batch, drawing from
    `self.generator` (save and restore its state to resume). Iterating yields single windows
    forever, so `DataLoader(sampler, batch_size=B)` works too; each DataLoader worker draws from
    its own generator seeded from (seed, worker id), so workers never repeat each other.
    """

    def __init__(self, shards: Shards, context_length: int, split: str = "train", seed: int = 0) -> None:
        if context_length < 1:
            raise InputError(f"context_length must be positive, not {context_length}")
        self.stream = TokenStream(shards, split)
        self.context_length = context_length
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.stream.check_fits(context_length)

    def get_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts(batch_size, self.generator)
        windows = torch.from_numpy(np.stack([self.stream.window(s, self.context_length + 1) for s in starts]))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        seed = int(np.random.SeedSequence([self.seed, worker_id]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        while True:
            for start in self._starts(1024, generator):  # draw starts a chunk at a time
                yield _pair(self.stream.window(start, self.context_length + 1))

    def _starts(self, n: int, generator: torch.Generator) -> list[int]:
        return torch.randint(len(self.stream) - self.context_length, (n,), generator=generator).tolist()
