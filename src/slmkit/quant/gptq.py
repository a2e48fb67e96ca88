"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight column by column, and after each column move its
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X^T X over calibration inputs X.

For one layer W [out, in]:
  1. H += damp * mean(diag H) * I  (dampening keeps the inverse well conditioned);
     with act_order, columns are processed by decreasing diag(H) (most active inputs first).
  2. U = upper Cholesky factor of H^-1; row i of U gives the update of the remaining columns
     when column i is quantized: W[:, i:] -= (w_i - q_i) / U_ii * U[i, i:].
  3. Columns go in blocks of `block_size`: updates inside a block are applied at once per column,
     updates of later columns lazily once per block (one matmul), which is the same arithmetic.
  4. Group-wise: each group's scale and zero point are chosen when its first column is reached,
     from the weights as updated so far.

The model is quantized sequentially: block inputs come from the already-quantized earlier blocks,
and inside a block the Linear layers are quantized in the order the block calls them, each one's
Hessian collected with the earlier ones already quantized (layers that read the same input, like
q/k/v, share one Hessian).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit.errors import InputError
from slmkit.model.transformer import Transformer
from slmkit.quant.calibration import (
    BlockInput,
    StopForward,
    block_inputs,
    linear_groups,
    run_block,
)
from slmkit.quant.linear import QuantizedLinear, group_size_fields
from slmkit.quant.rtn import check_group_size, qparams, quantize_codes
from slmkit.quant.targets import set_module


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W [out, in] and H [in, in] -> (codes int8 [out, in], scales [out, groups], zeros [out, groups],
    perm or None). With act_order, codes and groups are in the column order `perm`."""
    W = w.detach().float().t().contiguous()  # [in, out]: each column of w is a contiguous row here
    H = hessian.detach().float().to(W.device, copy=True)
    n_in, n_out = W.shape
    dead = H.diagonal() == 0  # inputs never active: their weights do not matter
    H[dead, dead] = 1
    W[dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(n_in, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise InputError(f"the calibration Hessian is not positive definite even with dampening {damp}; "
                         "raise --damp or give more calibration samples") from None

    codes = torch.zeros(n_in, n_out, dtype=torch.int8, device=W.device)
    scales = torch.zeros(n_in // group_size, n_out, device=W.device)
    zeros = torch.zeros(n_in // group_size, n_out, device=W.device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, U1 = W[i1:i2].clone(), U[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                scale, zero = qparams(torch.cat((W1[i:], W[i2:]))[:group_size].t(), bits, symmetric)
                scale, zero = scale[:, 0], zero[:, 0]
                scales[col // group_size], zeros[col // group_size] = scale, zero
            q = quantize_codes(W1[i], scale, zero, bits)
            codes[col] = q.to(torch.int8)
            err = (W1[i] - (q - zero) * scale) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * err[None, :]
            errors[i] = err
        W[i2:] -= U[i1:i2, i2:].t() @ errors
    return codes.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous(), perm


@torch.no_grad()
def hessian(block: nn.Module, linear: nn.Linear, inputs: list[BlockInput]) -> torch.Tensor:
    """H = 2 X^T X / n over every token that reaches `linear` while `block` runs on `inputs`
    (each pass stops at `linear`: the rest of the block is not needed)."""
    H = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
    seen = 0

    def accumulate(module: nn.Module, args: tuple) -> None:
        nonlocal H, seen
        x = args[0].detach().reshape(-1, linear.in_features).float()
        H *= seen / (seen + len(x))
        seen += len(x)
        H += (2 / seen) * x.T @ x
        raise StopForward

    handle = linear.register_forward_pre_hook(accumulate)
    try:
        for args, kwargs in inputs:
            try:
                block(*args, **kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
    return H


def quantize_model(model: Transformer, calib_ids: torch.Tensor, bits: int, group_sizes: dict[str, int | None],
                   symmetric: bool = True, act_order: bool = False, damp: float = 0.01, batch_size: int = 8,
                   progress: bool = False) -> dict:
    """Quantize every Linear of the blocks in place with GPTQ, layer `name` in groups of
    `group_sizes[name]` columns (None: per channel); returns the "quantization" config section."""
    names = []
    inputs = block_inputs(model, calib_ids, batch_size)
    for index, block in enumerate(tqdm(model.layers, desc="GPTQ", unit="block", disable=not progress)):
        for group in linear_groups(block, inputs):  # layers of a group share their input, so their Hessian
            H = hessian(block, block.get_submodule(group[0]), inputs)
            for name in group:
                linear = block.get_submodule(name)
                full_name = f"layers.{index}.{name}"
                g = check_group_size(full_name, linear.out_features, linear.in_features, group_sizes[full_name], bits)
                codes, scales, zeros, perm = gptq_quantize(linear.weight, H, bits, g, symmetric, act_order, damp)
                module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, g,
                                         symmetric, permuted=act_order)
                module.set_weights(codes, scales, None if symmetric else zeros.to(torch.int8), perm,
                                   None if linear.bias is None else linear.bias.detach())
                set_module(block, name, module.to(linear.weight.device))
                names.append(full_name)
        inputs = run_block(block, inputs)
    return {"method": "gptq", "bits": bits, **group_size_fields({n: group_sizes[n] for n in names}), "symmetric": symmetric,
            "act_order": act_order, "damp": damp, "modules": names}
