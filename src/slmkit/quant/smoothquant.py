"""SmoothQuant W8A8 (Xiao et al., 2022): int8 weights and int8 activations.

Activations of LLMs have a few input channels with large outliers, which per-token int8 rounding
handles badly, while weights are easy to quantize. For each input channel j a factor

    s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)

moves difficulty from the activations to the weights: X W^T = (X diag(1/s)) (W diag(s))^T exactly.
Where the input comes straight from a norm (q/k/v after input_layernorm, gate/up after
post_attention_layernorm) 1/s is folded into the norm's weight and bias, at no cost at run time;
other layers (o_proj, down_proj) divide their input by s before quantizing it. Then weights get
per-output-channel int8 scales and activations per-token int8 scales computed on the fly.
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.model.transformer import Transformer
from slmkit.quant.linear import W8A8Linear
from slmkit.quant.targets import BLOCKS, linear_targets, set_module
from slmkit.quant.rtn import quantize_rtn

FOLDS = {  # norm of a block -> the Linear layers (relative to the block) that read its output
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


@torch.no_grad()
def activation_maxima(model: Transformer, calib_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """max |x_j| over every calibration token, per input channel of every quantized Linear."""
    maxima: dict[str, torch.Tensor] = {}

    def observe(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    handles = [m.register_forward_hook(observe(name)) for name, m in linear_targets(model, include=BLOCKS).items()]
    device = model.embed_tokens.weight.device
    try:
        for batch in calib_ids.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    return maxima


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float().cpu() for w in weights]).amax(0)
    s = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    s = s.to(norm.weight)
    if getattr(norm, "plus_one", False):  # stores w - 1
        norm.weight.copy_((norm.weight + 1) / s - 1)
    else:
        norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)


@torch.no_grad()
def smooth(model: Transformer, act_max: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Scale every quantized Linear's weight columns by s (in place) and fold 1/s into the norm that
    feeds it; returns s for the layers whose input has no norm to fold into (the caller divides
    their inputs by it). Without quantization the model computes the same function."""
    linears = linear_targets(model, include=BLOCKS)
    unfolded: dict[str, torch.Tensor] = {}
    folded: set[str] = set()
    for index, block in enumerate(model.layers):
        for norm_name, names in FOLDS.items():
            names = [f"layers.{index}.{n}" for n in names if f"layers.{index}.{n}" in linears]
            if not names:
                continue
            s = smoothing_factors(act_max[names[0]], [linears[n].weight for n in names], alpha)
            _fold_into_norm(block.get_submodule(norm_name), s)
            for n in names:
                linears[n].weight.mul_(s.to(linears[n].weight))
            folded.update(names)
    for name, linear in linears.items():
        if name not in folded:
            s = smoothing_factors(act_max[name], [linear.weight], alpha)
            linear.weight.mul_(s.to(linear.weight))
            unfolded[name] = s
    return unfolded


def quantize_model(model: Transformer, calib_ids: torch.Tensor, alpha: float = 0.5, batch_size: int = 8) -> dict:
    """Smooth with calibrated activation maxima, then replace every Linear of the blocks by a
    W8A8Linear in place; returns the "quantization" config section."""
    unfolded = smooth(model, activation_maxima(model, calib_ids, batch_size), alpha)
    linears = linear_targets(model, include=BLOCKS)
    for name, linear in linears.items():
        codes, scales, _ = quantize_rtn(linear.weight.detach(), 8, linear.in_features, symmetric=True)
        module = W8A8Linear(linear.in_features, linear.out_features, linear.bias is not None, smoothed=name in unfolded)
        module.set_weights(codes, scales[:, 0], unfolded.get(name), None if linear.bias is None else linear.bias.detach())
        set_module(model, name, module.to(linear.weight.device))
    return {"method": "smoothquant", "bits": 8, "alpha": alpha, "modules": list(linears), "smoothed": sorted(unfolded)}
