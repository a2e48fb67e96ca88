"""Where the training loop's examples come from: one small interface, two sources.

    take(n) -> list of n examples     the next optimizer step's examples, the same on every rank
    state_dict() / load_state_dict()  the position in the data, for an exact resume

`RandomWindows` draws random windows of token shards (pretraining); `ShuffledEpochs` walks
prepared examples in seeded shuffled epochs (fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from slmkit.data import RandomWindowSampler


class DataSource(Protocol):
    def take(self, n: int) -> list[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomWindows:
    """n random (inputs, targets) windows per call; `to_pairs` turns the sampler's
    (window[:-1], window[1:]) into what the objective trains on (masked inputs, for MLM)."""

    def __init__(self, sampler: RandomWindowSampler, to_pairs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.sampler, self.to_pairs = sampler, to_pairs

    def take(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.to_pairs(*self.sampler.get_batch(n))
        return list(zip(x, y))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.sampler.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.generator.set_state(state["generator"])


class ShuffledEpochs:
    """The examples in seeded shuffled epochs, one after another (a batch may span two epochs)."""

    def __init__(self, examples: Sequence[Any], seed: int) -> None:
        self.examples, self.generator = examples, torch.Generator().manual_seed(seed)
        self.queue = torch.zeros(0, dtype=torch.long)  # indices not yet taken

    def take(self, n: int) -> list[Any]:
        while len(self.queue) < n:
            self.queue = torch.cat([self.queue, torch.randperm(len(self.examples), generator=self.generator)])
        indices, self.queue = self.queue[:n].tolist(), self.queue[n:]
        return [self.examples[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "queue": self.queue.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.queue = state["queue"].clone()
