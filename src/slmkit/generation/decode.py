"""The decoding loops over token ids: sampling/greedy for a batch, and beam search.

Prompts of different lengths are left-padded so that every row's next token sits in the last
column; the attention mask keeps padding out of attention and out of the positions, so a row
decodes exactly as it would alone. The KV cache means each step feeds only the new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from slmkit.errors import InputError
from slmkit.generation.sampling import SamplingParams, apply_penalties, choose
from slmkit.model.transformer import Transformer


def model_device(model: Transformer) -> torch.device:
    """Where the model's inputs go. Models that run outside PyTorch (ONNX Runtime) name it as
    `device`; a Transformer's is that of its embeddings."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else model.embed_tokens.weight.device


def prepare_for_decoding(model: Transformer) -> None:
    """Lay the weights out for one-row products (`Transformer.use_decoding_layout`);
    models that run outside PyTorch have nothing to do."""
    if isinstance(model, Transformer):
        model.use_decoding_layout()


def check_prompt(model: Transformer, prompt: Sequence[int]) -> None:
    context = model.cfg.context_length
    if not prompt:
        raise InputError("the prompt is empty; give at least one token")
    if len(prompt) > context:
        raise InputError(f"the prompt is {len(prompt)} tokens, longer than the model's context of {context} tokens; shorten it")


def new_token_budget(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    """Tokens that fit: the last one needs no forward pass of its own, hence the + 1."""
    return max(0, min(max_new_tokens, model.cfg.context_length - prompt_len + 1))


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> ids [B, T] and an attention mask [B, T] (None when no row needs padding).
    The padding id is 0: masked out, it is never seen, so any id does."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, (None if bool(mask.all()) else mask)


@torch.inference_mode()
def sample(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    done: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, [B], step by step; a row that has finished gets -1.

    A row finishes on a stop token (not yielded) or when the caller sets its entry in `done`
    ([B] bool, e.g. on a stop string). The loop ends when every row is finished, after
    `max_new_tokens`, or when the context is full.
    """
    for prompt in prompts:
        check_prompt(model, prompt)
    device = model_device(model)
    batch = len(prompts)
    ids, mask = left_pad(prompts, device)
    steps = new_token_budget(model, ids.shape[1], max_new_tokens)
    if steps == 0:
        return
    done = torch.zeros(batch, dtype=torch.bool, device=device) if done is None else done
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    vocab = model.cfg.vocab_size
    if params.needs_history:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, list(prompt)] = True
        counts = torch.zeros(batch, vocab, dtype=torch.long, device=device)

    prepare_for_decoding(model)
    cache = model.new_cache(batch, max_len=min(model.cfg.context_length, ids.shape[1] + steps))
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    for step in range(steps):
        if params.needs_history:
            logits = apply_penalties(logits.float(), seen, counts, params)
        token = choose(logits, params, generator)
        if len(stops):
            done |= torch.isin(token, stops)
        token = token.masked_fill(done, -1)
        if done.all():
            return
        yield token
        if done.all() or step == steps - 1:  # the caller may have finished the last rows
            return
        fed = token.clamp(min=0)[:, None]  # finished rows keep decoding (rows share one cache); ignored
        if params.needs_history:
            seen.scatter_(1, fed, True)
            counts.scatter_add_(1, fed, (~done).long()[:, None])
        if mask is not None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(fed, attention_mask=mask, cache=cache)[:, -1]


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    length_penalty: float = 1.0,
) -> list[int]:
    """The most likely continuation found by keeping `num_beams` hypotheses per step.

    A hypothesis that ends (stop token) is scored by its total log-probability divided by
    length ** length_penalty, so that longer answers are not penalized merely for being longer.
    The search stops once `num_beams` hypotheses have ended ("early stopping", which also makes
    one beam exactly greedy decoding) or the budget runs out.
    """
    check_prompt(model, prompt)
    if num_beams < 1:
        raise InputError(f"num_beams must be >= 1, not {num_beams}")
    steps = new_token_budget(model, len(prompt), max_new_tokens)
    if steps == 0:
        return []
    device = model_device(model)
    stops = set(stop_tokens)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    prepare_for_decoding(model)
    cache = model.new_cache(1, max_len=min(model.cfg.context_length, len(prompt) + steps))
    logits = model(ids, cache=cache, logits_to_keep=1)[:, -1]
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []

    def normalized(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(steps):
        candidates = scores[:, None] + torch.log_softmax(logits.float(), dim=-1)  # [beams, V]
        top_scores, top_index = candidates.flatten().topk(min(2 * num_beams, candidates.numel()))
        vocab = logits.shape[-1]
        rows, new_beams, new_scores = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            row, token = divmod(index, vocab)
            if token in stops:
                finished.append((normalized(score, len(beams[row]) + 1), beams[row]))
            else:
                rows.append(row)
                new_beams.append(beams[row] + [token])
                new_scores.append(score)
            if len(new_beams) == num_beams:
                break
        if len(finished) >= num_beams or step == steps - 1 or not new_beams:
            break
        beams, scores = new_beams, torch.tensor(new_scores, device=device)
        cache.select(torch.tensor(rows, device=device))
        logits = model(torch.tensor([b[-1] for b in beams], device=device)[:, None], cache=cache)[:, -1]
    if len(finished) < num_beams:  # the budget ran out: unfinished hypotheses compete too
        finished += [(normalized(s, len(b)), b) for s, b in zip(new_scores, new_beams)]
    return max(finished, key=lambda f: f[0])[1]
