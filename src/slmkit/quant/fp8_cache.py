"""KV caches stored in float8 e4m3: one fp32 scale per cached vector, about half the bytes of bf16.

`Transformer.new_cache(batch, fp8=True)` builds them; they follow the protocol of `KVCache` and
`LatentCache` (update, advance, select, nbytes).
"""

from __future__ import annotations

import torch

from slmkit.model.cache import Cache, DecodingCache
from slmkit.quant.fp8 import E4M3, fp8_max


class FP8Rows:
    """A preallocated fp8 buffer with one fp32 scale per row of its last dimension (a KV-cache vector)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.values = torch.zeros(shape, device=device).to(E4M3)
        self.scale = torch.ones(*shape[:-1], 1, device=device)

    def write(self, index: tuple, x: torch.Tensor) -> None:
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / fp8_max(E4M3)).clamp(min=1e-12)
        self.values[index] = (x.float() / scale).to(E4M3)
        self.scale[index] = scale

    def read(self, index: tuple, dtype: torch.dtype) -> torch.Tensor:
        return (self.values[index].float() * self.scale[index]).to(dtype)

    def select(self, rows: torch.Tensor, dim: int) -> None:
        self.values = self.values.index_select(dim, rows)
        self.scale = self.scale.index_select(dim, rows)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes


class FP8KVCache(Cache, DecodingCache):
    """`KVCache` with keys and values stored in e4m3, one scale per head vector (about half of bf16)."""

    def __init__(self, cfg, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k, self.v = FP8Rows(shape, device), FP8Rows(shape, device)
        self.length, self.max_len, self.dtype = 0, max_len, dtype

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        new, seen = (layer, slice(None), slice(None), slice(self.length, end)), (layer, slice(None), slice(None), slice(0, end))
        self.k.write(new, k)
        self.v.write(new, v)
        return self.k.read(seen, self.dtype), self.v.read(seen, self.dtype)

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        self.k.select(rows, 1)
        self.v.select(rows, 1)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class FP8LatentCache(FP8KVCache):
    """`LatentCache` in e4m3: the latent and the RoPE key, one scale per vector."""

    def __init__(self, cfg, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.k = FP8Rows((cfg.n_layers, batch_size, max_len, cfg.kv_lora_rank), device)
        self.v = FP8Rows((cfg.n_layers, batch_size, max_len, cfg.qk_rope_head_dim), device)
        self.length, self.max_len, self.dtype = 0, max_len, dtype

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + latent.shape[1]
        new, seen = (layer, slice(None), slice(self.length, end)), (layer, slice(None), slice(0, end))
        self.k.write(new, latent)
        self.v.write(new, rope_key)
        return self.k.read(seen, self.dtype), self.v.read(seen, self.dtype)
