"""Multi-token prediction (DeepSeek-V3) and self-speculative greedy decoding with it.

Module k (1..D) sees, at position i, the previous depth's hidden state and the embedding of token
i + k, and predicts token i + k + 1 through the shared output head:

    h^k_i = Block_k(eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)])),   logits^k_i = lm_head(norm_k(h^k_i))

h^0 is the main model's last hidden state before its final norm (`ModelOutput.last_hidden`). In
training, `model(inputs, targets=...)` runs the modules and returns their logits, for the weighted
loss of `slmkit.train.objectives.lm`; at inference they draft D tokens which the main
model verifies in one forward pass. Verification keeps the longest prefix of drafts that equal the
main model's own greedy choices, plus the main model's next token, so the output is exactly greedy
decoding; how many drafts survive is the acceptance rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model.layers import NORMS
from slmkit.model.moe import RouterStats


class MTPModule(nn.Module):
    """Names follow DeepSeek-V3's checkpoint (enorm, hnorm, eh_proj); `block` is an ordinary Block."""

    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.enorm = NORMS[cfg.norm](cfg.d_model, cfg)
        self.hnorm = NORMS[cfg.norm](cfg.d_model, cfg)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = block
        self.norm = NORMS[cfg.norm](cfg.d_model, cfg)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, rotation) -> tuple[torch.Tensor, RouterStats | None]:
        """This depth's hidden states, and its block's router statistics (an MoE block in training)."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        return self.block(x, rotation, None, None)


class MultiTokenPrediction(nn.Module):
    def __init__(self, cfg: ModelConfig, make_block: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(cfg, make_block(cfg.n_layers + k)) for k in range(cfg.mtp_depth))

    def forward(
        self, model: nn.Module, hidden: torch.Tensor, next_tokens: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[RouterStats]]:
        """Logits of every depth, and the router statistics of its MoE blocks. hidden [B, T, d]: h^0
        at positions 0..T-1; next_tokens [B, >= T]: the tokens at positions 1, 2, ... (the LM
        targets). Depth k returns [B, rows_k, V] for positions 0..rows_k-1, where rows_k shrinks by
        one per depth as the known tokens run out."""
        logits, router = [], []
        for k, module in enumerate(self.layers, start=1):
            rows = min(hidden.shape[1], next_tokens.shape[1] - k + 1)
            if rows < 1:
                break
            hidden, stats = module(hidden[:, :rows], model.embed_tokens(next_tokens[:, k - 1 : k - 1 + rows].clamp(min=0)),
                                   model.rotation_for(rows, hidden.device))
            logits.append(model.head(module.norm(hidden)))
            if stats is not None:
                router.append(stats)
        return logits, router


# ---------------------------------------------------------------------------- self-speculative decoding
@dataclass
class SpeculativeResult:
    tokens: list[int]
    drafted: int = 0  # draft tokens proposed by the MTP modules
    accepted: int = 0  # of those, equal to the main model's greedy choice
    forward_passes: int = 0  # main-model forward passes after the prompt
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_greedy(
    model: nn.Module, prompt: Sequence[int], max_new_tokens: int, stop_tokens: Sequence[int] = ()
) -> SpeculativeResult:
    """Greedy decoding of one prompt, drafting `mtp_depth` tokens per round with the model's own MTP
    modules; the tokens equal `slmkit.generation` greedy decoding (temperature 0)."""
    cfg = model.cfg
    if model.mtp is None:
        raise InputError("self-speculative decoding needs a model with MTP modules (mtp_depth >= 1)")
    if not prompt or len(prompt) > cfg.context_length:
        raise InputError(f"the prompt must have 1 to {cfg.context_length} tokens, not {len(prompt)}")
    device = model.embed_tokens.weight.device
    stops = set(stop_tokens)
    budget = max(0, min(max_new_tokens, cfg.context_length - len(prompt) + 1))
    result = SpeculativeResult(tokens=[])
    if budget == 0:
        return result
    cache = model.new_cache(1, max_len=cfg.context_length)
    ids = torch.tensor([list(prompt)], device=device)
    out = model.forward_hidden(ids, cache=cache)
    hidden = out.last_hidden  # h^0 of every position fed so far
    logits = model.head(out.hidden[:, -1:])
    sequence = list(prompt)
    next_token = int(logits[0, -1].argmax())
    while True:
        if next_token in stops:
            return result
        result.tokens.append(next_token)
        sequence.append(next_token)
        if len(result.tokens) >= budget:
            return result
        room = min(cfg.mtp_depth, budget - len(result.tokens), cfg.context_length - cache.length - 1)
        drafts = draft_tokens(model, hidden, sequence, room)
        fed = torch.tensor([[next_token, *drafts]], device=device)
        out = model.forward_hidden(fed, cache=cache)
        logits = model.head(out.hidden)
        result.forward_passes += 1
        greedy = logits[0].argmax(dim=-1).tolist()  # greedy[j]: the main model's token after fed[j]
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == greedy[n_ok] and drafts[n_ok] not in stops:
            n_ok += 1
        result.drafted += len(drafts)
        result.accepted += n_ok
        result.accepted_per_round.append(n_ok)
        keep = 1 + n_ok  # next_token and the accepted drafts now sit in the cache
        cache.length -= len(fed[0]) - keep  # forget the rejected drafts' keys and values
        hidden = torch.cat([hidden, out.last_hidden[:, :keep]], dim=1)
        for token in drafts[:n_ok]:
            result.tokens.append(token)
            sequence.append(token)
            if len(result.tokens) >= budget:
                return result
        next_token = greedy[n_ok]


def draft_tokens(model: nn.Module, hidden: torch.Tensor, sequence: Sequence[int], n: int) -> list[int]:
    """Up to n draft tokens after `sequence`: depth k reads the last row of depth k-1 and the newest
    token. hidden [1, R, d] holds h^0 of sequence[:R] with R = len(sequence) - 1; a suffix of the
    sequence with its hidden rows works too (RoPE attention depends only on relative positions)."""
    device = hidden.device
    drafts: list[int] = []
    tokens = torch.tensor([sequence[1:]], device=device)  # tokens at positions 1 .. len-1
    for module in model.mtp.layers[:n]:
        rows = min(hidden.shape[1], tokens.shape[1] - len(drafts))
        hidden, _ = module(hidden[:, :rows], model.embed_tokens(tokens[:, len(drafts) : len(drafts) + rows]),
                           model.rotation_for(rows, device))
        token = int(model.head(module.norm(hidden[:, -1:]))[0, -1].argmax())
        drafts.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
    return drafts
