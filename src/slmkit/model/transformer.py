"""One decoder (or encoder) Transformer for every family, assembled from a `ModelConfig`.

    x = embed(tokens) [* sqrt(d)] [+ positions]
    for each block:  x = x + attn(norm(x));  x = x + mlp(norm(x))
    logits = lm_head(norm(x)) [soft-capped]

`model(input_ids)` returns the logits. Callers that need more call the two halves:
`forward_hidden` runs the blocks and returns a `ModelOutput` (final hidden states, the hidden
state before the final norm that the MTP modules read, and in training the MoE balance loss and
expert load), and `head` turns hidden states into logits. A training step calls
`model(inputs, targets=targets)`, which returns the whole `ModelOutput` with the logits and the
MTP modules' logits filled in. Nothing a forward computes is left on the modules.

Module names follow the Hugging Face Llama layout (embed_tokens, layers.N.self_attn.q_proj, ...)
so weights map across with little more than a rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model.attention import Attention, KVCache
from slmkit.model.cache import Cache
from slmkit.model.layers import MLPS, NORMS, POSITIONS, PackedLinears
from slmkit.model.mla import LatentAttention, LatentCache
from slmkit.model.moe import ExpertLoad, MoE, RouterStats, moe_aux_loss
from slmkit.model.mtp import MultiTokenPrediction
from slmkit.quant.fp8_cache import FP8KVCache, FP8LatentCache
from slmkit.quant.linear import use_fp8_linears

ATTENTION_KINDS = {"mha": Attention, "mla": LatentAttention}
CACHES = {"mha": KVCache, "mla": LatentCache}
FP8_CACHES = {"mha": FP8KVCache, "mla": FP8LatentCache}
FEED_FORWARD = {"dense": lambda cfg, layer: MLPS[cfg.mlp](cfg), "moe": MoE}


@dataclass
class ModelOutput:
    """What one forward pass computed, for callers that need more than the logits."""

    hidden: torch.Tensor  # [B, T', d] after the final norm, the head's input (T' = logits_to_keep or T)
    last_hidden: torch.Tensor  # [B, T, d] before the final norm: h^0 of the MTP modules
    router: list[RouterStats] = field(default_factory=list)  # per MoE layer that ran in training
    aux_loss: torch.Tensor | None = None  # aux_loss_coef * mean MoE balance loss (training)
    logits: torch.Tensor | None = None  # [B, T', vocab], when the forward was given targets
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # per MTP depth, given targets

    @property
    def expert_load(self) -> ExpertLoad | None:
        """Expert assignments of the MoE layers, for `balance_step` (None: dense, or not training)."""
        return ExpertLoad.of(self.router)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = NORMS[cfg.norm](cfg.d_model, cfg)
        self.self_attn = ATTENTION_KINDS[cfg.attention_kind](cfg, layer)
        self.post_attention_layernorm = NORMS[cfg.norm](cfg.d_model, cfg)
        self.mlp = FEED_FORWARD[cfg.ffn_kind if layer >= cfg.first_k_dense else "dense"](cfg, layer)
        self.routed = isinstance(self.mlp, MoE)  # returns its RouterStats with its output
        self.dropout = cfg.dropout_resid
        self.sliding = cfg.sliding_window is not None and (cfg.sliding_window_layers is None or layer in cfg.sliding_window_layers)
        if cfg.output_norms:  # Gemma 2 also norms each sublayer's output ("sandwich" norms)
            self.attn_output_norm = NORMS[cfg.norm](cfg.d_model, cfg)
            self.mlp_output_norm = NORMS[cfg.norm](cfg.d_model, cfg)

    def forward(self, x, rotation, mask, cache: Cache | None) -> tuple[torch.Tensor, RouterStats | None]:
        """The block's output and, for an MoE block in training, its router's statistics."""
        x = x + self.residual(self.self_attn(self.input_layernorm(x), rotation, mask, cache), "attn_output_norm")
        h = self.post_attention_layernorm(x)
        y, stats = self.mlp(h) if self.routed else (self.mlp(h), None)
        return x + self.residual(y, "mlp_output_norm"), stats

    def residual(self, y: torch.Tensor, output_norm: str) -> torch.Tensor:
        """A sublayer's output on its way into the residual stream: normed (Gemma 2), dropped out
        (training). Skipping what is off saves module calls that decoding pays per token."""
        if output_norm in self._modules:
            y = self._modules[output_norm](y)
        return F.dropout(y, self.dropout) if self.training and self.dropout else y


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        for name, registry in (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS), ("attention_kind", ATTENTION_KINDS),
                               ("ffn_kind", FEED_FORWARD)):
            if getattr(cfg, name) not in registry:
                raise InputError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {', '.join(registry)}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = POSITIONS[cfg.pos](cfg)
        self.dropout = nn.Dropout(cfg.dropout_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = NORMS[cfg.norm](cfg.d_model, cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = MultiTokenPrediction(cfg, lambda layer: Block(cfg, layer)) if cfg.mtp_depth else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.fp8 != "none":
            use_fp8_linears(self, cfg.fp8)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab] (or final hidden states [B, T, d]).

        Arguments as in `forward_hidden`. Given `targets` [B, T] (the training objective's; for a
        causal LM the tokens at positions 1..T), returns the whole `ModelOutput` instead, with the
        logits and, for a model with MTP modules, the logits of every MTP depth: a training step
        takes its loss terms from it. It runs through `__call__`, so DDP and torch.compile see it.
        """
        out = self.forward_hidden(input_ids, attention_mask, cache, positions, logits_to_keep)
        if targets is None:
            return out.hidden if return_hidden else self.head(out.hidden)
        out.logits = self.head(out.hidden)
        if self.mtp is not None:
            out.mtp_logits, mtp_router = self.mtp(self, out.last_hidden, targets)
            out.router += mtp_router
        out.aux_loss = moe_aux_loss(out.router, self.cfg.aux_loss_coef)
        return out

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        positions: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """input_ids [B, T] -> `ModelOutput`: the blocks without the output head.

        `logits_to_keep` > 0 keeps only the last that many positions of `hidden`: a prompt's
        prefill needs the logits of its last token alone, and the output projection is the
        largest matmul.

        attention_mask [B, past + T] marks real tokens (1) and padding (0), for left-padded batches;
        with a `cache`, only the new tokens are passed and the cache supplies the past.
        `positions` [B, T] places every new token of a ragged batch (serving: each row at its own
        length); the cache (a `RaggedCache`) then also supplies `key_positions` [B, K] and the
        boolean `mask` [B, 1, T, K]. Without a cache, `positions` describe packed rows: each
        document starts again at position 0 and attends only within itself.
        """
        cfg = self.cfg
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        total = past + t
        if total > cfg.context_length:
            raise InputError(f"sequence of {total} tokens is longer than the model's context length {cfg.context_length}")
        if positions is None:
            positions, k_positions, mask = self._positions_and_mask(b, t, past, attention_mask, input_ids.device)
        elif cache is None:
            k_positions, mask = positions, self._packed_mask(positions)
        else:
            k_positions, mask = cache.key_positions, cache.mask

        x = self.embed_tokens(input_ids)
        if cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(cfg.d_model), dtype=x.dtype)
        x = self.dropout(self.pos.embed(x, positions))
        bias = self.pos.score_bias(positions, k_positions)
        if bias is not None:  # ALiBi: fold the distance penalty into an additive mask
            allowed = mask if mask is not None else self._causal(t, total, input_ids.device)
            mask = bias.masked_fill(~allowed, float("-inf")) if allowed is not None else bias
        rotation = self.pos.rotation(positions)
        window_mask, local_rotation = None, rotation
        if cfg.sliding_window:  # the sliding-window layers: a narrower mask, and their own RoPE base (Gemma 3)
            window_mask = self._window(mask, positions, k_positions, t, total)
            if cfg.rope_local_theta is not None:
                local_rotation = self.pos.rotation(positions, local=True)
        router: list[RouterStats] = []
        for block in self.layers:
            x, stats = block(x, local_rotation if block.sliding else rotation, window_mask if block.sliding else mask, cache)
            if stats is not None:
                router.append(stats)
        if cache is not None:
            cache.advance(t)
        last_hidden = x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return ModelOutput(self.norm(x), last_hidden, router, moe_aux_loss(router, cfg.aux_loss_coef))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized hidden states -> logits (shared by the MTP modules and the serving engine)."""
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    def use_decoding_layout(self, on: bool = True) -> None:
        """Lay the weights out for decoding, which multiplies one row by every weight matrix per
        token; or put the standard layout back (`on=False`).

        Linears that read the same input (q/k/v, gate/up) are packed side by side into one buffer
        (`PackedLinears`), and every widening matrix (more outputs than inputs: the packs, the
        output projection, GPT-2's up projection) is stored column-major, which CPU BLAS streams
        faster: 1.6-1.8x for GPT-2's [50257, 768] output projection (see BENCHMARKS.md). The
        parameters, their shapes and values stay the same, and training still works (the packed
        path is used only without gradients). The generation loops and the serving engine switch
        this on; `save_model_dir` switches it off, since safetensors writes contiguous, unshared
        tensors only: do the same before handing the model to other code that expects them.
        """
        groups = [(m, [getattr(m, name) for name in m.PACKED]) for m in self.modules() if hasattr(m, "PACKED")]
        with torch.inference_mode(False), torch.no_grad():
            for module, linears in groups:
                packed = module.__dict__.pop("packed", None)
                if on and packed is not None and packed.current(linears):
                    module.packed = packed
                elif packed is not None:  # switched off, or gone stale: no parameter may still share storage
                    PackedLinears.unpack(linears)
                if on and "packed" not in module.__dict__ and PackedLinears.packable(linears):
                    module.packed = PackedLinears(linears)
            for module in self.modules():
                if type(module) is not nn.Linear or module.out_features <= module.in_features:
                    continue
                weight = module.weight
                if weight.is_contiguous() == on and weight.device.type == "cpu":
                    weight.data = weight.data.t().contiguous().t() if on else weight.data.contiguous()

    def rotation_for(self, length: int, device: torch.device):
        """RoPE tables of positions 0..length-1 for one row (MTP modules run on plain prefixes)."""
        return self.pos.rotation(torch.arange(length, device=device)[None])

    def _causal(self, t: int, total: int, device: torch.device) -> torch.Tensor | None:
        if not self.cfg.causal:
            return None
        return torch.ones(t, total, dtype=torch.bool, device=device).tril(diagonal=total - t)

    def _window(self, mask, positions, k_positions, t, total):
        """`mask` narrowed to the last `sliding_window` keys of each query (bool, or additive with ALiBi)."""
        near = (positions[:, :, None] - k_positions[:, None, :]) < self.cfg.sliding_window  # [B, Tq, Tk]
        near = near[:, None] | _diagonal(t, total, positions.device)  # a padding query still sees itself
        if mask is None:
            causal = self._causal(t, total, positions.device)
            return near if causal is None else near & causal
        return mask & near if mask.dtype == torch.bool else mask.masked_fill(~near, float("-inf"))

    def _packed_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, T]: each token sees the tokens of its own document (earlier ones, in a decoder);
        a document begins wherever the positions restart at 0."""
        document = (positions == 0).cumsum(-1)  # [B, T]
        mask = document[:, :, None] == document[:, None, :]
        causal = self._causal(positions.shape[1], positions.shape[1], positions.device)
        return (mask if causal is None else mask & causal)[:, None]

    def _positions_and_mask(self, b, t, past, attention_mask, device):
        """Positions of the new tokens and of all keys, and a boolean mask when padding needs one."""
        total = past + t
        if attention_mask is None:
            k_positions = torch.arange(total, device=device).expand(b, total)
            return k_positions[:, past:], k_positions, None
        if attention_mask.shape != (b, total):
            raise InputError(f"attention_mask must have shape {(b, total)}, not {tuple(attention_mask.shape)}")
        valid = attention_mask.bool()
        k_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        allowed = valid[:, None, :].expand(b, t, total)
        causal = self._causal(t, total, device)
        if causal is not None:
            allowed = allowed & causal
        # a padding query may see nothing else; letting it see itself keeps softmax finite
        allowed = allowed | _diagonal(t, total, device)
        return k_positions[:, past:], k_positions, allowed[:, None]

    def new_cache(self, batch_size: int, max_len: int | None = None, fp8: bool = False) -> KVCache | LatentCache | FP8KVCache:
        """A contiguous cache (`Cache` and `DecodingCache`) for `batch_size` rows; `fp8` stores it in
        e4m3 with per-vector scales."""
        p = self.embed_tokens.weight
        return (FP8_CACHES if fp8 else CACHES)[self.cfg.attention_kind](self.cfg, batch_size, max_len or self.cfg.context_length, p.device, p.dtype)

    def num_parameters(self, embedding: bool = True) -> int:
        """Parameters, counting tied weights once; `embedding=False` leaves out the token and
        position embeddings (the convention of scaling-law papers)."""
        total = sum(p.numel() for p in self.parameters())
        if not embedding:
            total -= self.embed_tokens.weight.numel()
            if self.cfg.pos == "learned":
                total -= self.pos.wpe.weight.numel()
        return total


def _diagonal(t: int, total: int, device: torch.device) -> torch.Tensor:
    """[t, total] True where query i meets its own key (at index total - t + i)."""
    return torch.arange(total, device=device)[None, :] == torch.arange(total - t, total, device=device)[:, None]
