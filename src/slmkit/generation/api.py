"""`generate` and `stream`: text in, text out, over the id-level loops of `decode`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from slmkit.chat import StopTokens, stop_token_ids
from slmkit.generation.decode import beam_search, model_device, sample
from slmkit.generation.sampling import SamplingParams
from slmkit.generation.text import TextStream
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Special-token strings in a prompt become their tokens (the caller wrote them on purpose);
    an empty prompt starts from the end-of-text token, the usual document boundary."""
    ids = tokenizer.encode(prompt, allowed_special="all")
    if not ids and tokenizer.eot_token:
        ids = [tokenizer.eot_id]
    return ids


def _generator(seed: int | None, model: Transformer) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=model_device(model)).manual_seed(seed)


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 50,
    params: SamplingParams | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
) -> list[list[int]]:
    """Token-level generation for a batch of prompts (left-padded together)."""
    out: list[list[int]] = [[] for _ in prompts]
    steps = sample(model, prompts, params or SamplingParams(), max_new_tokens, stop_tokens, _generator(seed, model))
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            if token >= 0:
                out[row].append(token)
    return out


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    stop: Sequence[str] = (),
    stop_tokens: StopTokens = None,
    seed: int | None = None,
) -> str | list[str]:
    """The continuation of `prompt` (without the prompt); a list of prompts gives a list, generated
    as one left-padded batch. Temperature 0 is greedy; `num_beams` > 1 is beam search (which
    ignores the sampling settings). Output ends before the first `stop` string or stop token
    (default: the end-of-text token)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        return []
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    stop_ids = stop_token_ids(tokenizer, stop_tokens)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    texts = ["" for _ in prompts]
    if num_beams > 1:
        for row, prompt_ids in enumerate(ids):
            for token in beam_search(model, prompt_ids, num_beams, max_new_tokens, stop_ids, length_penalty):
                texts[row] += streams[row].push(token)
    else:
        done = torch.zeros(len(prompts), dtype=torch.bool, device=model_device(model))
        steps = sample(model, ids, params, max_new_tokens, stop_ids, _generator(seed, model), done)
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if token >= 0:
                    texts[row] += streams[row].push(token)
                    done[row] |= streams[row].stopped
    texts = [text + s.finish() for text, s in zip(texts, streams)]
    return texts[0] if isinstance(prompt, str) else texts


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop: Sequence[str] = (),
    stop_tokens: StopTokens = None,
    seed: int | None = None,
) -> Iterator[str]:
    """`generate` for one prompt, yielding text as it becomes final; the pieces join to exactly
    what `generate` returns (never half a character, never part of a stop string)."""
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty)
    ids = encode_prompt(tokenizer, prompt)
    yield from stream_ids(model, tokenizer, ids, max_new_tokens, params, stop, stop_token_ids(tokenizer, stop_tokens), seed)


def stream_ids(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[str]:
    """`stream` from a prompt that is already token ids (chat builds its prompts that way)."""
    text = TextStream(tokenizer, stop)
    done = torch.zeros(1, dtype=torch.bool, device=model_device(model))
    for tokens in sample(model, [prompt], params, max_new_tokens, stop_tokens, _generator(seed, model), done):
        if delta := text.push(int(tokens[0])):
            yield delta
        done[0] = text.stopped
    if rest := text.finish():
        yield rest
