"""Calibration data: token windows from text files, and the inputs of each Transformer block."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slmkit.data.corpus import Corpus
from slmkit.errors import InputError
from slmkit.model.transformer import Transformer
from slmkit.quant.targets import linear_targets
from slmkit.tokenizer import Tokenizer

BlockInput = tuple[tuple[Any, ...], dict[str, Any]]  # positional and keyword arguments of one block call


def calibration_windows(tokenizer: Tokenizer, paths: Iterable[str | os.PathLike], samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at random offsets of the documents joined by the
    end-of-text token -> LongTensor [samples, seq_len] (fewer, shorter rows for a short text)."""
    if samples < 1:
        raise InputError(f"calibration samples must be >= 1, not {samples}")
    paths = list(paths)
    sep = [tokenizer.eot_id] if tokenizer.eot_token else []
    ids: list[int] = []
    try:
        for text in Corpus(paths):
            ids += sep + tokenizer.encode_ordinary(text)
    except InputError as e:
        raise InputError(f"calibration data: {e}") from None
    if len(ids) - len(sep) < 2:
        raise InputError(f"calibration data is empty: {', '.join(map(str, paths))} hold no text; pass --calib FILES with text like the model's")
    tokens = torch.tensor(ids)
    if len(ids) <= seq_len:
        return tokens[None]
    starts = torch.randint(0, len(ids) - seq_len + 1, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has seen what it needs."""


@torch.no_grad()
def block_inputs(model: Transformer, ids: torch.Tensor, batch_size: int = 8) -> list[BlockInput]:
    """The arguments the first block receives for each batch of calibration windows."""
    captured: list[BlockInput] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise StopForward

    handle = model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    device = model.embed_tokens.weight.device
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device))
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[BlockInput]:
    """Feed every batch through `block`; its outputs, with the same other arguments, are the next block's inputs."""
    return [((block(*args, **kwargs)[0], *args[1:]), kwargs) for args, kwargs in inputs]  # (hidden states, router stats)


@torch.no_grad()
def linear_groups(block: nn.Module, inputs: list[BlockInput]) -> list[list[str]]:
    """Names (relative to `block`) of its Linear modules in the order a forward pass calls them,
    grouped when consecutive ones read the same input tensor (q/k/v, gate/up)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args[0])))
               for name, m in linear_targets(block, exclude=()).items()]
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for i, (name, x) in enumerate(calls):
        if any(name in g for g in groups):
            continue
        if i and calls[i - 1][1] is x:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups
