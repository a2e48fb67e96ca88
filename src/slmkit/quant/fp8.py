"""Weight-only float8 (e4m3: 4 exponent bits, 3 mantissa bits, largest value 448).

A scale per tensor (or per group of input columns) maps the largest |w| onto 448, then every
weight is rounded to the nearest e4m3 number. Unlike int codes the grid is denser near zero, which
suits the bell-shaped weight distributions of trained models.
"""

from __future__ import annotations

import torch

from slmkit.model.transformer import Transformer
from slmkit.quant.linear import FP8Linear, set_module, target_linears
from slmkit.quant.rtn import check_group_size

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_fp8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (float8_e4m3fn [out, in], scales [1, 1] per tensor or [out, in / group_size])."""
    out_features, in_features = w.shape
    groups = w.detach().float().reshape(1, 1, -1) if group_size is None else \
        w.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (groups / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(out_features, in_features), scale


def quantize_model(model: Transformer, group_size: int | None = None) -> dict:
    """Replace every Linear of the blocks by an FP8Linear in place; returns the config section."""
    linears = target_linears(model)
    for name, linear in linears.items():
        if group_size is not None:
            check_group_size(name, linear.out_features, linear.in_features, group_size, 8)
        q, scales = quantize_fp8(linear.weight, group_size)
        module = FP8Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        module.set_weights(q, scales, None if linear.bias is None else linear.bias.detach())
        set_module(model, name, module.to(linear.weight.device))
    return {"method": "fp8", "format": "e4m3", "group_size": group_size, "modules": list(linears)}
