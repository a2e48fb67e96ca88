"""Mixture-of-Experts feed-forward: a router picks k of n experts per token (Mixtral, Qwen3-MoE, DeepSeek-V3).

    scores = softmax(x W_r) | sigmoid(x W_r)                       per token, per expert
    chosen = top-k of (scores + bias)  [within the best groups]    bias: auxiliary-loss-free balancing
    y      = shared(x) + sum_{e in chosen} w_e * expert_e(x),      w = scores of the chosen [normalized] * scale

Dispatch sorts the (token, expert) assignments by expert so each expert runs one matmul over all its
tokens (`dispatch`); `dense_reference` runs every expert on every token and masks, and is the one
to read. Tests hold them equal. Balancing comes two ways: an auxiliary loss (Switch/GShard), and a
per-expert bias that only steers selection, nudged after each optimizer step toward the
underloaded experts (DeepSeek-V3). A capacity factor caps tokens per expert (the rest are
dropped: they pass through on the residual); without it, dispatch is dropless. A training forward
returns each layer's balance loss and expert load (`RouterStats`) next to its output; the
Transformer gathers them into its `ModelOutput`, and the trainer hands the load of every
micro-batch to `balance_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.model.layers import MLPS


@dataclass
class Routing:
    scores: torch.Tensor  # [N, E] fp32 router scores (softmax or sigmoid)
    weights: torch.Tensor  # [N, k] fp32 combine weights of the chosen experts
    experts: torch.Tensor  # [N, k] chosen expert ids


class Router(nn.Module):
    """`mlp.gate` in HF names: a weight [E, d] and the selection bias `e_score_correction_bias` [E]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))  # saved: it is learned state

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if cfg.router_score == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias  # the bias steers selection, never the weights
        if cfg.n_expert_groups > 1:
            choice = limit_to_groups(choice, cfg.n_expert_groups, cfg.topk_groups)
        experts = choice.topk(cfg.n_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(scores, weights * cfg.routed_scaling, experts)


def limit_to_groups(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep the experts of each token's `topk_groups` best groups (a group scores the sum of its two
    best experts, DeepSeek-V3); the others get -inf so top-k cannot pick them."""
    n, e = choice.shape
    grouped = choice.view(n, n_groups, e // n_groups)
    group_scores = grouped.topk(min(2, e // n_groups), dim=-1).values.sum(dim=-1)  # [N, G]
    best = group_scores.topk(topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)


def capacity(cfg: ModelConfig, n_tokens: int) -> int | None:
    """Most assignments an expert takes, or None (dropless)."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.n_experts_per_tok / cfg.n_experts)


def kept_assignments(routing: Routing, limit: int | None) -> torch.Tensor:
    """[N, k] bool: which assignments survive the capacity limit (earlier tokens first, as in GShard)."""
    n_experts = routing.scores.shape[1]
    flat = routing.experts.flatten()
    if limit is None:
        return torch.ones_like(routing.experts, dtype=torch.bool)
    one_hot = F.one_hot(flat, n_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank of each assignment within its expert
    return (position < limit).view_as(routing.experts)


def dispatch(x: torch.Tensor, routing: Routing, experts: nn.ModuleList, keep: torch.Tensor) -> torch.Tensor:
    """Sort assignments by expert; each expert runs once over its contiguous block of tokens."""
    k = routing.experts.shape[1]
    flat_expert = routing.experts.flatten().masked_fill(~keep.flatten(), len(experts))  # dropped: past the last
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=len(experts) + 1)[: len(experts)].tolist()
    order = order[: sum(counts)]
    token = order // k
    inputs = x[token]
    outputs = torch.cat([expert(block) for expert, block in zip(experts, inputs.split(counts)) if len(block)]
                        or [inputs[:0]])
    weighted = outputs * routing.weights.flatten()[order, None].to(outputs.dtype)
    return torch.zeros_like(x).index_add_(0, token, weighted)


def dense_reference(x: torch.Tensor, routing: Routing, experts: nn.ModuleList, keep: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then a [N, E] combine matrix zero outside the kept top-k."""
    every = torch.stack([expert(x) for expert in experts], dim=1)  # [N, E, d]
    combine = torch.zeros(x.shape[0], len(experts), dtype=routing.weights.dtype, device=x.device)
    combine.scatter_add_(1, routing.experts, routing.weights * keep)
    return (every * combine[..., None].to(every.dtype)).sum(dim=1)


def balance_loss(routing: Routing, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e: f_e the fraction of assignments to e,
    P_e its mean (per-token normalized) score. It is 1 at perfect balance and grows with skew."""
    f = torch.bincount(routing.experts.flatten(), minlength=n_experts).float() / routing.experts.numel()
    p = (routing.scores / routing.scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    return n_experts * (f * p).sum()


@dataclass
class RouterStats:
    """What one MoE layer's training forward reports: its balance loss (None when
    aux_loss_coef is 0), assignments per expert [E] and assignments dropped at capacity."""

    balance_loss: torch.Tensor | None
    load: torch.Tensor
    dropped: torch.Tensor


@dataclass
class ExpertLoad:
    """Assignments per expert [n_moe_layers, E] and dropped assignments [n_moe_layers] of the MoE
    layers (in `moe_layers` order) over one or more training forwards; micro-batches add up."""

    load: torch.Tensor
    dropped: torch.Tensor

    @classmethod
    def of(cls, stats: list[RouterStats]) -> ExpertLoad | None:
        if not stats:
            return None
        return cls(torch.stack([s.load for s in stats]), torch.stack([s.dropped for s in stats]))

    def __add__(self, other: ExpertLoad) -> ExpertLoad:
        return ExpertLoad(self.load + other.load, self.dropped + other.dropped)


class MoE(nn.Module):
    """Routed experts + optional shared experts. In training, also returns its `RouterStats`."""

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLPS[cfg.mlp](cfg, cfg.moe_ffn_hidden) for _ in range(cfg.n_experts))
        if cfg.n_shared_experts:
            self.shared_experts = MLPS[cfg.mlp](cfg, cfg.moe_ffn_hidden * cfg.n_shared_experts)
        self.reference = False  # True: `dense_reference` instead of `dispatch` (tests)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.gate(flat)
        keep = kept_assignments(routing, capacity(self.cfg, flat.shape[0]))
        y = (dense_reference if self.reference else dispatch)(flat, routing, self.experts, keep)
        if self.cfg.n_shared_experts:
            y = y + self.shared_experts(flat)
        stats = None
        if self.training:
            with torch.no_grad():
                load = torch.bincount(routing.experts.flatten(), minlength=self.cfg.n_experts).float()
                dropped = (~keep).sum()
            balance = balance_loss(routing, self.cfg.n_experts) if self.cfg.aux_loss_coef else None
            stats = RouterStats(balance, load, dropped)
        return y.view(shape), stats

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: raise the bias of underloaded experts, lower the overloaded."""
        if self.cfg.router_bias_rate and load.sum() > 0:
            self.gate.e_score_correction_bias += self.cfg.router_bias_rate * torch.sign(load.mean() - load)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def moe_aux_loss(stats: list[RouterStats], aux_loss_coef: float) -> torch.Tensor | None:
    """aux_loss_coef * mean balance loss of the MoE layers of one training forward (None without one)."""
    losses = [s.balance_loss for s in stats if s.balance_loss is not None]
    return aux_loss_coef * torch.stack(losses).mean() if losses else None


def load_statistics(load: torch.Tensor) -> dict[str, float]:
    """max/mean load (1 = perfect balance) and routing entropy normalized to [0, 1] (1 = uniform)."""
    total = load.sum()
    if total <= 0:
        return {"max_mean": float("nan"), "entropy": float("nan")}
    p = load / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum() / math.log(len(load))
    return {"max_mean": (load.max() / load.mean()).item(), "entropy": entropy.item()}


def balance_step(model: nn.Module, loads: Sequence[ExpertLoad | None]) -> dict[str, list[float]]:
    """After an optimizer step, given the `ModelOutput.expert_load` of each of its micro-batches:
    per-layer utilization of their summed load, and the bias update. Empty for a dense model."""
    layers = moe_layers(model)
    present = [load for load in loads if load is not None]
    if not layers or not present:
        return {}
    total = sum(present[1:], present[0])
    stats: dict[str, list[float]] = {}
    for (_, m), load, dropped in zip(layers, total.load, total.dropped.tolist()):
        for key, value in {**load_statistics(load), "dropped": float(dropped)}.items():
            stats.setdefault(f"moe_{key}", []).append(value)
        m.update_bias(load)
    return stats
