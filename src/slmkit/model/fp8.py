"""FP8 linear layers (DeepSeek-V3 recipe) and FP8 storage of weights and the KV cache.

Training: the forward pass multiplies e4m3 copies of activations and weights (3 mantissa bits,
max 448), the backward pass e5m2 gradients (2 mantissa bits, max 57344: range matters more than
precision for gradients). Each tile of values shares one fp32 scale, amax / fp8_max, so an outlier
only costs precision in its own tile: 1x128 tiles of activations and gradients, 128x128 blocks of
weights (`blockwise`), or one scale per tensor (`tensor`). Products accumulate in fp32.

Where the device multiplies fp8 natively (`torch._scaled_mm`, per-tensor scales), it is used; everywhere
else the same numbers come from quantize -> dequantize emulation followed by an fp32 matmul,
so the numerics are the same and can be tested on a CPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.model.cache import Cache, DecodingCache

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
TILE = 128
GRANULARITIES = ("blockwise", "tensor")


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def quantize(x: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x -> (fp8 values, fp32 scales [ceil(M/bm), ceil(K/bk)]); block None: one scale for all.
    x ~= values * scale, blockwise (ragged edges form smaller blocks)."""
    m, k = x.shape
    bm, bk = block or (m, k)
    pm, pk = -m % bm, -k % bk
    tiles = F.pad(x.float(), (0, pk, 0, pm)).view((m + pm) // bm, bm, (k + pk) // bk, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = (amax / fp8_max(dtype)).clamp(min=1e-12)
    values = (tiles / scale[:, None, :, None]).clamp(-fp8_max(dtype), fp8_max(dtype)).to(dtype)
    return values.view(m + pm, k + pk)[:m, :k], scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m, k = values.shape
    bm, bk = -(-m // scale.shape[0]), -(-k // scale.shape[1])
    full = scale.repeat_interleave(bm, dim=0).repeat_interleave(bk, dim=1)[:m, :k]
    return (values.float() * full).to(dtype)


def fake_quantize(x: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] | None) -> torch.Tensor:
    """x as it survives a round trip through fp8 with the given scaling, in fp32."""
    return dequantize(*quantize(x, dtype, block))


def blocks(granularity: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(activation/gradient tile, weight block) of a granularity."""
    return ((1, TILE), (TILE, TILE)) if granularity == "blockwise" else (None, None)


@functools.cache
def scaled_mm_supported(device_type: str) -> bool:
    """Whether `torch._scaled_mm` multiplies e4m3 matrices with per-tensor scales on this device."""
    try:
        a = torch.ones(16, 16, device=device_type).to(E4M3)
        one = torch.ones((), device=device_type)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, granularity: str, native: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T with both operands in e4m3, fp32 result. `native` None: `_scaled_mm` when the
    device supports it and the scaling is per-tensor with dims that are multiples of 16."""
    act_block, weight_block = blocks(granularity)
    xq, xs = quantize(x, E4M3, act_block)
    wq, ws = quantize(w, E4M3, weight_block)
    if native is None:
        native = (granularity == "tensor" and scaled_mm_supported(x.device.type)
                  and all(n % 16 == 0 for n in (*x.shape, w.shape[0])))
    if native:
        return torch._scaled_mm(xq, wq.t(), scale_a=xs.view(()), scale_b=ws.view(()), out_dtype=torch.float32)
    return dequantize(xq, xs) @ dequantize(wq, ws).t()


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with e4m3 operands forward and e5m2 output gradients backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, granularity: str) -> torch.Tensor:
        act_block, weight_block = blocks(granularity)
        x2 = x.reshape(-1, x.shape[-1])
        y = fp8_matmul(x2, weight, granularity)
        # backward reuses the fp8 copies (what a real kernel keeps instead of the bf16 activations)
        ctx.save_for_backward(fake_quantize(x2, E4M3, act_block), fake_quantize(weight, E4M3, weight_block))
        ctx.granularity, ctx.has_bias, ctx.shape = granularity, bias is not None, x.shape
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        gq = fake_quantize(g, E5M2, blocks(ctx.granularity)[0])
        grad_x = (gq @ w).to(grad.dtype).view(ctx.shape)
        grad_w = (gq.t() @ x).to(grad.dtype)
        grad_b = g.sum(dim=0).to(grad.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class FP8Linear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose matmuls run in FP8."""

    granularity = "blockwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.granularity)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every nn.Linear but the output head (kept in high precision, as DeepSeek-V3 does)."""
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            if type(child) in (nn.Linear, FP8Linear) and f"{parent_name}.{name}".strip(".") != "lm_head":
                found.append((parent, name, child))
    return found


def use_fp8_linears(model: nn.Module, granularity: str) -> nn.Module:
    """Turn the model's linear layers into `FP8Linear` in place (parameters untouched)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8 must be one of {', '.join(GRANULARITIES)} or none, not {granularity!r}")
    for _, _, linear in _linears(model):
        linear.__class__ = FP8Linear
        linear.granularity = granularity
    return model


# ---------------------------------------------------------------------------- inference storage
class FP8WeightLinear(nn.Module):
    """Inference-only linear layer whose weight is stored as e4m3 values + 128x128 block scales
    (1 byte per weight instead of 2 or 4), dequantized on the fly."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        values, scale = quantize(linear.weight.detach(), E4M3, (TILE, TILE))
        self.register_buffer("weight_fp8", values)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight_fp8, self.weight_scale, x.dtype), self.bias)


def store_weights_fp8(model: nn.Module) -> nn.Module:
    """Replace every linear layer but the output head by an `FP8WeightLinear`, in place."""
    for parent, name, linear in _linears(model):
        setattr(parent, name, FP8WeightLinear(linear))
    return model


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
