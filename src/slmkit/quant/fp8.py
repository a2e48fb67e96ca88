"""The float8 formats and FP8 matmuls (the DeepSeek-V3 recipe for training).

Training (`FP8TrainingLinear` in quant/linear.py): the forward pass multiplies e4m3 copies of
activations and weights (3 mantissa bits, max 448), the backward pass e5m2 gradients (2 mantissa
bits, max 57344: range matters more than precision for gradients). Each tile of values shares one fp32 scale, amax / fp8_max, so an outlier
only costs precision in its own tile: 1x128 tiles of activations and gradients, 128x128 blocks of
weights (`blockwise`), or one scale per tensor (`tensor`). Products accumulate in fp32.

Where the device multiplies fp8 natively (`torch._scaled_mm`, per-tensor scales), it is used; everywhere
else the same numbers come from quantize -> dequantize emulation followed by an fp32 matmul,
so the numerics are the same and can be tested on a CPU.

Weight-only fp8 storage (`slmkit quantize --method fp8`, `FP8Linear`) uses the same `quantize`
with one scale per tensor or per group of input columns.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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
