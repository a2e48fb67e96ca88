"""Integer weight quantization by round-to-nearest, and int4 packing.

A weight W [out, in] is cut into groups of `group_size` consecutive input columns (one group
spanning the whole row is per-channel quantization). Each group g of a row gets a scale s and an
integer zero point z, and every weight becomes a signed integer code

    q = clamp(round(w / s) + z, -2^(b-1), 2^(b-1) - 1),      w ~= (q - z) * s

Symmetric quantization has z = 0 and s = max|w| / (2^(b-1) - 1); asymmetric quantization maps
[min w, max w] onto all 2^b codes, which helps groups whose weights are not centred on zero.
Codes of 4-bit weights are stored two per byte (`pack_int4`).
"""

from __future__ import annotations

import torch

from slmkit.errors import InputError


def code_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` [..., n] (over its last dimension), both [..., 1]."""
    qmin, qmax = code_range(bits)
    w = w.float()
    if symmetric:
        scale = w.abs().amax(-1, keepdim=True) / qmax
        zero = torch.zeros_like(scale)
    else:
        lo = w.amin(-1, keepdim=True).clamp(max=0)  # keep 0 exactly representable
        hi = w.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = qmin - torch.round(lo / scale.clamp(min=1e-12))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    return scale, zero.clamp(qmin, qmax)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = code_range(bits)
    return torch.clamp(torch.round(w.float() / scale) + zero, qmin, qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """w rounded to the grid (q - z) * s, as floats."""
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def check_group_size(name: str, out_features: int, in_features: int, group_size: int | None, bits: int) -> int:
    """The group size in columns (the whole row when None), or a one-line error naming the layer."""
    if group_size is None:
        group_size = in_features
    if group_size < 1 or in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0 and g != group_size]
        hint = f"; choose a divisor such as {' or '.join(map(str, divisors[:2]))}" if divisors else ""
        raise InputError(f"group size {group_size} does not divide the input dimension {in_features} of {name} "
                         f"(weight {out_features}x{in_features}){hint}")
    if bits == 4 and in_features % 2:
        raise InputError(f"int4 packs two weights per byte: the input dimension {in_features} of {name} must be even")
    return group_size


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> codes int8 [out, in], scales and zero points float32 [out, in / group_size]."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group_size, group_size)
    scale, zero = qparams(groups, bits, symmetric)
    codes = quantize_codes(groups, scale, zero, bits).reshape(out_features, in_features).to(torch.int8)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """codes [out, in] with scales (and zero points) [out, groups] -> float32 weights [out, in]."""
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, scale.shape[1], -1).float()
    if zero is not None:
        groups = groups - zero.float()[..., None]
    return (groups * scale.float()[..., None]).reshape(out_features, in_features)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes in [-8, 7], int8 [..., n] with n even -> uint8 [..., n / 2]: column 2i in the low
    nibble, column 2i + 1 in the high nibble of byte i (stored with an offset of 8)."""
    if codes.shape[-1] % 2:
        raise InputError(f"int4 packing needs an even number of columns, not {codes.shape[-1]}")
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., n / 2] -> int8 codes [..., n]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)
