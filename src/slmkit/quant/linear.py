"""Every quantized linear layer: the replacements for `nn.Linear` that store or compute in fewer bits.

- `QuantizedLinear`: weight-only int8/int4 (round-to-nearest, GPTQ; the frozen int8 base of QLoRA).
- `Q8_0Linear`: llama.cpp's Q8_0 (int8 blocks of 32 with fp16 scales), computing as llama.cpp does:
  activations rounded to the same blocks before the dot products.
- `W8A8Linear`: int8 weights times int8 activations (SmoothQuant).
- `FP8Linear`: weight-only float8 e4m3.
- `FP8TrainingLinear`: an `nn.Linear` whose matmuls run in fp8 (FP8 training; same parameters).

The storage kinds keep their quantized weights as buffers, so `state_dict()` / safetensors hold
exactly the packed codes and scales, and a model directory reloads by building the same empty
modules and loading the file into them (`install`). Which linears get replaced is decided by
`slmkit.quant.targets.linear_targets`.

Kernels: on the CPU measured here (see bench/bench_quant.py --kernels) `torch._weight_int8pack_mm`
and `torch._int_mm` were slower than converting the codes to floats and calling one matmul, at
decode (1 row) and prefill shapes alike, so every module computes by dequantize-then-matmul.
Per-channel scales are applied to the matmul output rather than to the weight, which saves a
pass over the weight.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.quant import fp8
from slmkit.quant.rtn import dequantize, pack_int4, unpack_int4
from slmkit.quant.targets import linear_targets, set_module


class QuantizedLinear(nn.Module):
    """Weight-only int8/int4 linear layer: codes (two int4 per byte), per-group scales, optional
    zero points (asymmetric) and an optional input-column permutation (GPTQ act-order, whose
    groups are consecutive in the permuted order)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool = True, permuted: bool = False) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = in_features // group_size
        if bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=torch.int8))
        self.register_buffer("perm", torch.arange(in_features) if permuted else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def set_weights(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Fill from int codes [out, in] (in the permuted column order when `perm` is given)."""
        self.qweight.copy_(pack_int4(codes) if self.bits == 4 else codes)
        self.scales.copy_(scales)
        if self.zeros is not None:
            self.zeros.copy_(zeros)
        if self.perm is not None:
            self.perm.copy_(perm)
        if self.bias is not None:
            self.bias.data.copy_(bias)
        return self

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out, in] in the model's column order."""
        w = dequantize(self.codes(), self.scales, self.zeros)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.scales.shape[1] == 1:  # per channel: x (q - z)^T s = (x q^T - sum(x) z) s
            y = F.linear(x, self.codes().to(x.dtype))
            if self.zeros is not None:
                y = y - x.sum(-1, keepdim=True) * self.zeros[:, 0].to(x.dtype)
            y = y * self.scales[:, 0].to(x.dtype)
        else:
            y = F.linear(x, dequantize(self.codes(), self.scales, self.zeros).to(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        kind = "symmetric" if self.zeros is None else "asymmetric"
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group_size}, {kind}"


Q8_0_BLOCK = 32


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp rounds the activations of its Q8_0 dot products (ggml's
    `quantize_row_q8_0`): per block of 32 values along the last dimension, the codes
    round(x * 127 / amax) and the scale amax / 127 stored as fp16. Ties round to even, as ggml's
    AVX2/AVX-512 path does (`_mm256_round_ps`); its scalar reference rounds them away from zero."""
    blocks = x.float().unflatten(-1, (-1, Q8_0_BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0.0))
    return (codes * (amax / 127).half().float()).flatten(-2).to(x.dtype)


class Q8_0Linear(QuantizedLinear):
    """llama.cpp's Q8_0 weights (one fp16 scale per 32 int8 codes of a row, 8.5 bits a weight) as
    its CPU backend computes them: the activation is rounded to Q8_0 blocks too (`round_q8_0`),
    then each pair of blocks contributes dot(codes, codes) * d_w * d_x (`ggml_vec_dot_q8_0_q8_0`).
    Dequantized operands in one float32 matmul give the same sum, every product d * q being exact
    in float32, to within float32 rounding of the summation order."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias, bits=8, group_size=Q8_0_BLOCK)
        self.scales = self.scales.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(round_q8_0(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q8_0 (int8 blocks of 32, fp16 scales, Q8_0 activations)"


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations (per token, quantized on the fly).

    An optional `smooth` vector divides the input first (SmoothQuant's migration of activation
    outliers into the weights, for inputs that do not come straight from a norm it could be folded
    into). The integer matmul is computed exactly in float32 while |sum| < 2^24 (K <= 1040 input
    features at full-range codes), to within float rounding beyond.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, smoothed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("smooth", torch.ones(in_features) if smoothed else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def set_weights(self, codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> W8A8Linear:
        self.qweight.copy_(codes)
        self.scales.copy_(scales)
        if self.smooth is not None:
            self.smooth.copy_(smooth)
        if self.bias is not None:
            self.bias.data.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        x_codes = torch.round(x / x_scale).clamp(-127, 127)
        y = F.linear(x_codes, self.qweight.to(x.dtype)) * (x_scale * self.scales.to(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8{', smoothed' if self.smooth is not None else ''}"


class FP8Linear(nn.Module):
    """Weight-only float8 (e4m3) linear layer with one scale per tensor or per group of input
    columns. CPUs have no fp8 matmul worth using: the weight is dequantized, then multiplied."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        shape = (1, 1) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scales", torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def set_weights(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> FP8Linear:
        self.qweight.copy_(weight)
        self.scales.copy_(scales)
        if self.bias is not None:
            self.bias.data.copy_(bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.qweight, self.scales, None).to(x.dtype), bias)

    def extra_repr(self) -> str:
        scales = "per tensor" if self.group_size is None else f"group={self.group_size}"
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3, {scales}"


class FP8TrainingLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose matmuls run in FP8: e4m3 operands
    forward, e5m2 gradients backward, with the scaling of `granularity` (see quant/fp8.py)."""

    granularity = "blockwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8.FP8LinearFunction.apply(x, self.weight, self.bias, self.granularity)


QUANTIZED_LINEARS = (QuantizedLinear, W8A8Linear, FP8Linear)  # the kinds whose weights are stored quantized


def use_fp8_linears(model: nn.Module, granularity: str) -> nn.Module:
    """Turn every linear layer but the output head (kept in high precision, as DeepSeek-V3 does)
    into an `FP8TrainingLinear` in place; parameters are untouched."""
    if granularity not in fp8.GRANULARITIES:
        raise ValueError(f"fp8 must be one of {', '.join(fp8.GRANULARITIES)} or none, not {granularity!r}")
    for linear in linear_targets(model).values():
        linear.__class__ = FP8TrainingLinear
        linear.granularity = granularity
    return model


def group_size_fields(sizes: dict[str, int | None]) -> dict[str, Any]:
    """How config.json's "quantization" section records each layer's group size: "group_size" is
    the size most layers have, "group_sizes" lists the layers that have another one."""
    common = Counter(sizes.values()).most_common(1)[0][0] if sizes else None
    other = {name: size for name, size in sizes.items() if size != common}
    return {"group_size": common, **({"group_sizes": other} if other else {})}


def group_size_of(section: dict[str, Any], name: str) -> int | None:
    """The group size of layer `name`: its own entry in "group_sizes" (sizes chosen per layer),
    else the section's "group_size" (None: per channel, or per tensor for fp8)."""
    return section.get("group_sizes", {}).get(name, section.get("group_size"))


def empty_module(linear: nn.Linear, section: dict[str, Any], name: str) -> nn.Module:
    """An unfilled quantized module of the layout `section` (config.json's "quantization") describes."""
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    method = section["method"]
    if method == "q8_0":
        return Q8_0Linear(*args)
    if method == "smoothquant":
        return W8A8Linear(*args, smoothed=name in section.get("smoothed", ()))
    if method == "fp8":
        return FP8Linear(*args, group_size=group_size_of(section, name))
    group_size = group_size_of(section, name) or linear.in_features
    return QuantizedLinear(*args, bits=section["bits"], group_size=group_size, symmetric=section.get("symmetric", True),
                           permuted=section.get("act_order", False))


def install(model: nn.Module, section: dict[str, Any]) -> None:
    """Swap the Linear modules listed in `section["modules"]` for empty quantized ones (before
    loading a quantized state dict into `model`)."""
    for name in section["modules"]:
        set_module(model, name, empty_module(model.get_submodule(name), section, name))
