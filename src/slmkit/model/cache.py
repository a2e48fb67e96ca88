"""What the model asks of a cache of past keys and values, declared once.

Every cache that `Transformer.forward` accepts implements `Cache`: the attention layers call
`update`, the forward reads `length` and calls `advance` once per pass. Implementations:

    KVCache, LatentCache            contiguous, preallocated (generation loops, offloaded models)
    FP8KVCache, FP8LatentCache      the same in e4m3 with per-vector scales (`new_cache(fp8=True)`)
    PastKeyValues                   explicit past/present tensors, the shape ONNX export traces
    PagedBatch                      one serving step over a paged pool (a `RaggedCache`)

The decoding loops (`slmkit.generation.decode`) hold whatever `model.new_cache()` returns, which
may also be an ONNX Runtime cache that never reaches `Transformer.forward`; they need only a
`DecodingCache`. The Transformer's own caches are both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Cache(Protocol):
    """Past keys and values of every layer, for a batch whose rows all hold `length` positions."""

    length: int  # positions already cached (0 for a `RaggedCache`, whose rows differ)

    def update(self, layer: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's tensors of the new positions and return that layer's tensors of every
        position so far. Attention passes keys [B, Hkv, T, D] and values; latent attention (MLA)
        passes its latent [B, T, r] and shared RoPE key [B, T, d_rope]."""
        ...

    def advance(self, n: int) -> None:
        """After every layer has stored the pass's `n` new positions: they now count as past."""
        ...


@runtime_checkable
class RaggedCache(Cache, Protocol):
    """A batch whose rows hold different numbers of positions (a serving step). The forward
    then takes each new token's position from the caller and these from the cache."""

    key_positions: torch.Tensor  # [B, K] position of every key `update` returns
    mask: torch.Tensor  # [B, 1, T, K] bool: which keys each new token may attend to


@runtime_checkable
class DecodingCache(Protocol):
    """What a decoding loop does with a cache between forward passes."""

    length: int  # positions held; a speculative loop lowers it to forget rejected drafts

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        ...
