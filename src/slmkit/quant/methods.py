"""In-memory quantization of a model: `quantize_model(model, method, ...)`, and the frozen int8
base of QLoRA (`quantize_int8`).

Group sizes: int4 and GPTQ share one scale among `group_size` consecutive input columns. Without
a given size, each layer takes the largest of 128, 64, 32, 16 that divides its input width (the
`tiny` preset's FFN width 704 gets 64, its width 256 gets 128), and the config section records
what was chosen (see `group_size_fields`). A given size that does not divide a layer's width is
an error naming the layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from slmkit.errors import InputError
from slmkit.model.transformer import Transformer
from slmkit.quant import METHODS, fp8, gptq, smoothquant
from slmkit.quant.linear import FP8Linear, QuantizedLinear, group_size_fields
from slmkit.quant.rtn import check_group_size, quantize_rtn
from slmkit.quant.targets import BLOCKS, linear_targets, set_module

NEEDS_CALIBRATION = ("gptq", "smoothquant")
GROUPED_BY_DEFAULT = ("int4", "gptq")  # the others default to one scale per output channel (fp8: per tensor)
DEFAULT_GROUP_SIZES = (128, 64, 32, 16)  # the first that divides a layer's input width is its default

GroupSizes = dict[str, int | None]  # layer name -> input columns per scale (None: the whole row, or per tensor for fp8)


def check_method(method: str, group_size: int | None) -> None:
    """Fail on a bad method or group size before any work."""
    if method not in METHODS:
        raise InputError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if group_size is not None and group_size < 0:
        raise InputError(f"group size must be >= 0 (0: per channel), not {group_size}")
    if method == "smoothquant" and group_size:
        raise InputError("smoothquant uses per-channel int8 weights; --group-size does not apply to it")


def default_group_size(in_features: int) -> int | None:
    """The largest of DEFAULT_GROUP_SIZES that divides `in_features` (None: per channel)."""
    return next((g for g in DEFAULT_GROUP_SIZES if in_features % g == 0), None)


def group_sizes(model: nn.Module, method: str, group_size: int | None = None) -> GroupSizes:
    """The group size of every layer `method` quantizes. `group_size` None: the method's default
    (for int4/gptq chosen per layer, `default_group_size`); 0: per channel (per tensor for fp8)."""
    check_method(method, group_size)
    bits = 4 if method in GROUPED_BY_DEFAULT else 8
    sizes: GroupSizes = {}
    for name, linear in linear_targets(model, include=BLOCKS).items():
        size = default_group_size(linear.in_features) if group_size is None and method in GROUPED_BY_DEFAULT \
            else group_size or None
        check_group_size(name, linear.out_features, linear.in_features, size, bits)
        sizes[name] = size
    return sizes


def group_size_summary(model: nn.Module, sizes: GroupSizes) -> str:
    """What `group_sizes` chose, by input width, e.g. "per layer: 128 for input width 256 (16 layers),
    64 for input width 704 (4 layers)"."""
    counts = Counter((model.get_submodule(name).in_features, size) for name, size in sizes.items())
    return "per layer: " + ", ".join(
        f"{'per channel' if size is None else size} for input width {width} ({n} layer{'s' * (n > 1)})"
        for (width, size), n in sorted(counts.items()))


@torch.no_grad()
def quantize_rtn_linears(model: nn.Module, linears: dict[str, nn.Linear], bits: int, sizes: GroupSizes,
                         symmetric: bool = True) -> None:
    """Replace `linears` by round-to-nearest int8/int4 `QuantizedLinear`s in place (a layer not in
    `sizes`: one scale per output channel)."""
    for name, linear in linears.items():
        g = check_group_size(name, linear.out_features, linear.in_features, sizes.get(name), bits)
        codes, scales, zeros = quantize_rtn(linear.weight.detach(), bits, g, symmetric)
        module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, g, symmetric)
        module.set_weights(codes, scales, None if symmetric else zeros.to(torch.int8),
                           bias=None if linear.bias is None else linear.bias.detach())
        set_module(model, name, module.to(linear.weight.device))


@torch.no_grad()
def quantize_fp8_linears(model: nn.Module, linears: dict[str, nn.Linear], sizes: GroupSizes) -> None:
    """Replace `linears` by weight-only e4m3 `FP8Linear`s in place: a scale per tensor, or per group of input columns."""
    for name, linear in linears.items():
        size = sizes.get(name)
        values, scales = fp8.quantize(linear.weight.detach(), fp8.E4M3, None if size is None else (1, size))
        module = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, size)
        module.set_weights(values, scales, None if linear.bias is None else linear.bias.detach())
        set_module(model, name, module.to(linear.weight.device))


def quantize_model(model: nn.Module, method: str, *, group_size: int | None = None, symmetric: bool = True,
                   calib_ids: torch.Tensor | None = None, alpha: float = 0.5, act_order: bool = False,
                   damp: float = 0.01, progress: bool = False) -> dict:
    """Quantize the linears of a model's blocks in memory (in place); returns the "quantization"
    section of its config.json. `group_size` None is the method's default (int4/gptq: chosen per
    layer), 0 per channel (per tensor for fp8)."""
    sizes = group_sizes(model, method, group_size)
    model.eval()
    if isinstance(model, Transformer):  # calibration hooks must see each linear called on its own, not packed
        model.use_decoding_layout(False)
    if method in NEEDS_CALIBRATION and calib_ids is None:
        raise InputError(f"{method} needs calibration text: pass --calib FILES (text like the model's domain)")
    linears = linear_targets(model, include=BLOCKS)
    if method in ("int8", "int4"):
        bits = 8 if method == "int8" else 4
        quantize_rtn_linears(model, linears, bits, sizes, symmetric)
        return {"method": method, "bits": bits, **group_size_fields(sizes), "symmetric": symmetric, "modules": list(linears)}
    if method == "fp8":
        quantize_fp8_linears(model, linears, sizes)
        return {"method": "fp8", "format": "e4m3", **group_size_fields(sizes), "modules": list(linears)}
    if method == "gptq":
        return gptq.quantize_model(model, calib_ids, 4, sizes, symmetric, act_order, damp, progress=progress)
    if not 0 <= alpha <= 1:
        raise InputError(f"smoothquant alpha must be between 0 and 1, not {alpha}")
    return smoothquant.quantize_model(model, calib_ids, alpha)


def quantize_int8(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> int:
    """The frozen base of QLoRA: every linear layer but `skip` as weight-only int8 with one scale
    per output channel, in place; returns how many were replaced."""
    linears = linear_targets(model, exclude=skip)
    quantize_rtn_linears(model, linears, 8, {})
    return len(linears)
