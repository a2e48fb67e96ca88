"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one small latent.

Per token, a down-projection makes a latent c_kv of `kv_lora_rank` dims and one RoPE key k_rope of
`qk_rope_head_dim` dims shared by all heads; only those two are cached. Each head's key and value
are up-projections of c_kv (`kv_b_proj`):

    naive:     k_h = [W_uk_h c_kv ; k_rope],  v_h = W_uv_h c_kv,  ordinary attention over (q_h, k_h, v_h)
    absorbed:  q_h . k_h = (W_uk_h^T q_nope_h) . c_kv + q_rope_h . k_rope  and  o_h = W_uv_h (sum_j p_j c_kv_j)

The absorbed form never materializes per-head keys or values: it is a single-KV-head (MQA) attention
over [c_kv ; k_rope] with a query of kv_lora_rank + qk_rope_head_dim dims, which is why decoding
reads only the latent. Both forms give the same numbers (tested).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.model.attention import ATTENTION
from slmkit.model.cache import Cache, DecodingCache
from slmkit.model.layers import RMSNorm, apply_rotary


class LatentCache(Cache, DecodingCache):
    """Per layer and position: the normalized KV latent and the rotated shared RoPE key, nothing else."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        self.latent = torch.zeros(cfg.n_layers, batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.rope_key = torch.zeros(cfg.n_layers, batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, T, r], rope_key [B, T, d_rope] of the new positions -> everything so far."""
        end = self.length + latent.shape[1]
        self.latent[layer, :, self.length : end] = latent
        self.rope_key[layer, :, self.length : end] = rope_key
        return self.latent[layer, :, :end], self.rope_key[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        self.latent = self.latent[:, rows]
        self.rope_key = self.rope_key[:, rows]

    def nbytes(self) -> int:
        return self.latent.nbytes + self.rope_key.nbytes


class LatentAttention(nn.Module):
    """MLA with HF DeepSeek-V3 module names (q_a_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, ...)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, qk_dim = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=cfg.attn_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, h * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attn_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.d_model, bias=cfg.attn_bias)

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if cfg.q_lora_rank else self.q_proj(x)
        q = q.view(b, t, cfg.n_heads, -1).transpose(1, 2)  # [B, H, T, nope + rope]
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, rope_key = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        rope_key = rope_key[:, None]  # [B, 1, T, rope]: one key for every head
        if rotation is not None:
            q_rope, rope_key = apply_rotary(q_rope, *rotation), apply_rotary(rope_key, *rotation)
        if cache is not None:
            latent, rope_key = cache.update(self.layer, latent, rope_key[:, 0])
            rope_key = rope_key[:, None]
        form = self.absorbed if cfg.mla_absorb else self.naive
        y = form(q_nope, q_rope, latent, rope_key, mask)  # [B, H, T, v]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.v_head_dim))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_uk [H, nope, r] and W_uv [H, v, r]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)

    def _attend(self, q, k, v, mask):
        dropout = self.cfg.dropout_attn if self.training else 0.0
        return ATTENTION[self.cfg.attention](q, k, v, mask, self.cfg.causal, dropout)

    def naive(self, q_nope, q_rope, latent, rope_key, mask) -> torch.Tensor:
        """Expand the latent into per-head keys and values, then ordinary attention."""
        cfg = self.cfg
        b, tk = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(b, tk, cfg.n_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, rope_key.expand(-1, cfg.n_heads, -1, -1)], dim=-1)
        return self._attend(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)

    def absorbed(self, q_nope, q_rope, latent, rope_key, mask) -> torch.Tensor:
        """Attend in latent space: one shared key [c_kv ; k_rope] and value c_kv, queries mapped by W_uk^T."""
        cfg = self.cfg
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1)
        # the attention kernels scale by 1/sqrt(q dims); MLA's scale is 1/sqrt(nope + rope)
        q = q * math.sqrt(q.shape[-1] / (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim))
        k = torch.cat([latent[:, None], rope_key], dim=-1)  # [B, 1, Tk, r + rope]
        out_latent = self._attend(q, k, latent[:, None], mask)  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bhtv", out_latent, w_uv)
