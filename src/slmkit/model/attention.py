"""Multi-head attention (MHA / GQA / MQA) with a KV cache, in two implementations.

`reference_attention` spells every step out (scores, mask, softmax, weighted sum); it is the
one to read. `sdpa_attention` hands the same computation to PyTorch's fused kernel. Tests hold
them equal for every variant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.model.cache import Cache, DecodingCache
from slmkit.model.layers import NORMS, apply_rotary, packed_outputs


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, dropout: float,
    scale: float | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, Hkv, Tk, D]; mask: bool (True = may attend) or additive float.
    `scale` defaults to 1/sqrt(D); `softcap` squashes scores into (-softcap, softcap)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # each kv head serves `groups` query heads
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1)  # [B, H, Tq, Tk]
    scores = scores * scale if scale else scores / math.sqrt(q.shape[-1])
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout)
    return probs @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, dropout: float,
    scale: float | None = None, softcap: float | None = None,
) -> torch.Tensor:
    if softcap:  # the fused kernel has no score soft-capping
        return reference_attention(q, k, v, mask, causal, dropout, scale, softcap)
    # is_causal aligns the mask top-left, which is only right when queries and keys coincide;
    # with more keys than queries (chunked prefill) the mask is spelled out. A single query
    # (decoding) may see every key, so it needs no mask at all.
    tq, tk = q.shape[-2], k.shape[-2]
    causal = causal and mask is None and tq > 1
    is_causal = causal and tq == tk
    if causal and not is_causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


ATTENTION = {"reference": reference_attention, "sdpa": sdpa_attention}


class KVCache(Cache, DecodingCache):
    """Keys and values of every layer for up to `max_len` positions, preallocated once."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (same for every row)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of one layer; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]


class Attention(nn.Module):
    PACKED = ("q_proj", "k_proj", "v_proj")  # read the same input: one matmul when packed for decoding

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = NORMS["rmsnorm"](cfg.head_dim, cfg)
            self.k_norm = NORMS["rmsnorm"](cfg.head_dim, cfg)

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = packed_outputs(self, x, self.PACKED)
        # split heads: [B, T, H*D] -> [B, H, T, D]
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotation is not None:
            q, k = apply_rotary(q, *rotation), apply_rotary(k, *rotation)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        dropout = cfg.dropout_attn if self.training else 0.0
        y = ATTENTION[cfg.attention](q, k, v, mask, cfg.causal, dropout, cfg.attn_scale, cfg.attn_softcap)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))  # merge heads
