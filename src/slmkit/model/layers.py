"""The small components a Transformer is assembled from, each chosen by name from a registry."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig


# ---------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32. `plus_one` stores w - 1 (Gemma), so zeros mean identity."""

    def __init__(self, dim: int, eps: float = 1e-5, plus_one: bool = False) -> None:
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.plus_one:
            weight = weight.float() + 1.0
        if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            return rms_norm_by_layer_norm(x, weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), self.eps).to(x.dtype)


def rms_norm_by_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm through LayerNorm's fused CPU kernel, for inference: on CPU `F.rms_norm` runs as
    about eight separate ops, a noticeable share of a decoding step. [x, -x] has mean 0 and
    variance mean(x^2), so LayerNorm of it is x / sqrt(mean(x^2) + eps) on its first half."""
    d = x.shape[-1]
    return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * d,), eps=eps)[..., :d] * weight


def layer_norm(dim: int, cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


def rms_norm(dim: int, cfg: ModelConfig) -> nn.Module:
    return RMSNorm(dim, eps=cfg.norm_eps, plus_one=cfg.norm_plus_one)


NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}


# ---------------------------------------------------------------------------- packed linears
class PackedLinears:
    """Linears that read the same input (q/k/v, gate/up) with their weights side by side in one
    buffer that each weight is a view of, so decoding runs one matmul instead of several: fewer
    calls per token, and one long stream through memory instead of short ones.

    The buffer is column-major (its transpose contiguous), the layout CPU BLAS streams fastest for
    one-row products (`Transformer.use_decoding_layout`). The parameters stay what they were;
    anything that gives one of them new storage (`.to(dtype)`, loading with `assign=True`)
    silently ends the packing, which `outputs` notices and then declines.
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        weights = torch.cat([lin.weight.detach() for lin in linears])
        self.weight = weights.t().contiguous().t()
        self.bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
        self.sizes = [lin.out_features for lin in linears]
        for lin, w in zip(linears, self.weight.split(self.sizes)):
            lin.weight.data = w
        if self.bias is not None:
            for lin, b in zip(linears, self.bias.split(self.sizes)):
                lin.bias.data = b
        self.pointers = [lin.weight.data_ptr() for lin in linears]

    @staticmethod
    def packable(linears: list[nn.Module]) -> bool:
        if not all(type(lin) is nn.Linear for lin in linears):  # adapters and quantized linears are not
            return False
        first = linears[0].weight
        return first.device.type == "cpu" and all(
            lin.weight.dtype == first.dtype and lin.weight.device == first.device and lin.in_features == linears[0].in_features
            and (lin.bias is None) == (linears[0].bias is None) for lin in linears)

    def outputs(self, x: torch.Tensor, linears: list[nn.Module]) -> tuple[torch.Tensor, ...] | None:
        """Each linear's output from one matmul, or None when the packed path does not apply:
        gradients must reach the parameters themselves, and the weights must still be the views."""
        if torch.is_grad_enabled() or not self.current(linears):
            return None
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def current(self, linears: list[nn.Module]) -> bool:
        """Whether the linears' weights are still the views of this buffer."""
        if not all(type(lin) is nn.Linear for lin in linears):  # wrapped since, e.g. by adapters
            return False
        return [lin.weight.data_ptr() for lin in linears] == self.pointers

    @staticmethod
    def unpack(linears: list[nn.Linear]) -> None:
        """Give every parameter its own contiguous storage again (linears replaced since, e.g. by
        quantized ones, hold their own)."""
        for lin in linears:
            if type(lin) is not nn.Linear:
                continue
            lin.weight.data = lin.weight.data.clone(memory_format=torch.contiguous_format)
            if lin.bias is not None:
                lin.bias.data = lin.bias.data.clone()


def packed_outputs(module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of `module`'s linears `names` on x: one matmul when they are packed, else one each."""
    linears = [getattr(module, name) for name in names]
    packed = module.__dict__.get("packed")
    outputs = packed.outputs(x, linears) if packed is not None else None
    return outputs if outputs is not None else tuple(lin(x) for lin in linears)


# ---------------------------------------------------------------------------- feed-forward
# Activations are plain functions, not modules: they hold no state, and a module call costs a
# decoding step more than the activation itself.
Activation = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """up -> activation -> down (GPT-2)."""

    def __init__(self, cfg: ModelConfig, activation: Activation, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.ffn_hidden
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU (Llama), GeGLU with GELU (Gemma)."""

    PACKED = ("gate_proj", "up_proj")  # read the same input: one matmul when packed for decoding

    def __init__(self, cfg: ModelConfig, activation: Activation, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.ffn_hidden
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed_outputs(self, x, self.PACKED)
        return self.down_proj(self.act(gate) * up)


MLPS = {  # (cfg, hidden=None): hidden overrides ffn_hidden (experts are narrower)
    "gelu": lambda cfg, hidden=None: MLP(cfg, F.gelu, hidden),
    "gelu_tanh": lambda cfg, hidden=None: MLP(cfg, gelu_tanh, hidden),
    "swiglu": lambda cfg, hidden=None: GatedMLP(cfg, F.silu, hidden),
    "geglu": lambda cfg, hidden=None: GatedMLP(cfg, gelu_tanh, hidden),
}


# ---------------------------------------------------------------------------- positions
class Positions(nn.Module):
    """Where position information enters: added to the embeddings, rotated into q/k, or added
    to the attention scores. The base class does none of these (`pos: none`)."""

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x

    def rotation(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) tables for `apply_rotary`, computed once per forward and shared by all layers
        (`local`: by the sliding-window layers, where those rotate by their own base)."""
        return None

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None


class LearnedPositions(Positions):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.wpe(positions)


class SinusoidalPositions(Positions):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pos = torch.arange(cfg.context_length, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, cfg.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / cfg.d_model))
        table = torch.zeros(cfg.context_length, cfg.d_model)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)[:, : cfg.d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.table[positions].to(x.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies of RoPE, with linear or Llama-3 scaling for longer contexts; `local`: those
    of the sliding-window layers of a model that gives them their own base (unscaled, as Gemma 3's)."""
    dim = cfg.rope_dim or cfg.head_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = {} if local else cfg.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unknown rope scaling type {kind!r} (linear or llama3)")
    return inv_freq


class RotaryPositions(Positions):
    """RoPE in the half-split layout of Llama/HF: pairs (i, i + d/2) rotate together."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        if cfg.rope_local_theta is not None:
            self.register_buffer("local_inv_freq", rope_frequencies(cfg, local=True), persistent=False)

    def rotation(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.local_inv_freq if local else self.inv_freq
        angles = positions[..., None].float() * inv_freq  # [B, T, d/2]
        cos, sin = angles.cos(), angles.sin()
        # [B, 1, T, d]: the first half of each pair turns by -sin, the second by +sin
        return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of x [B, H, T, d] by its position's angle, in fp32:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); rolling by d/2 brings each partner alongside."""
    h = x.float()
    return (h * cos + h.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


class ALiBiPositions(Positions):
    """A per-head linear penalty on query-key distance instead of any position embedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self.causal = cfg.causal

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # [B, Tq, Tk]
        distance = distance.clamp(min=0) if self.causal else distance.abs()
        return -self.slopes[None, :, None, None] * distance[:, None]  # [B, H, Tq, Tk]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; interleaved extras when n is not a power of 2."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(n_heads - closest)]
    return torch.tensor(base + extra)


POSITIONS = {
    "none": lambda cfg: Positions(),
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "alibi": ALiBiPositions,
}
