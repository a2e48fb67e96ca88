"""Datasets over token shards: exact windows, shifted targets, shard boundaries, seeded sampling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from slmkit.data import RandomWindowSampler, SlidingWindowDataset, load_shards, prepare
from slmkit.errors import InputError

# Tokens 0..29 in three shards of unequal length, so that windows cross boundaries.
SHARDS = [np.arange(0, 10, dtype=np.uint16), np.arange(10, 25, dtype=np.uint16), np.arange(25, 30, dtype=np.uint16)]


def test_disjoint_windows():
    ds = SlidingWindowDataset(SHARDS, context_length=4)
    assert len(ds) == 7  # starts 0, 4, ..., 24; the last needs tokens 24..28
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(4 * i, 4 * i + 4))
        assert y.tolist() == list(range(4 * i + 1, 4 * i + 5))
    assert ds[2][0].tolist() == [8, 9, 10, 11]  # across the first shard boundary
    assert ds[-1][0].tolist() == [24, 25, 26, 27]  # across the second
    with pytest.raises(IndexError):
        ds[7]


def test_overlapping_windows():
    ds = SlidingWindowDataset(SHARDS, context_length=8, stride=3)
    assert len(ds) == 8  # starts 0, 3, ..., 21; 21 + 8 + 1 = 30 tokens
    assert [ds[i][0][0].item() for i in range(len(ds))] == list(range(0, 22, 3))
    x, y = ds[7]
    assert x.tolist() == list(range(21, 29)) and y.tolist() == list(range(22, 30))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    context=st.integers(1, 12),
    stride=st.integers(1, 12),
)
def test_windows_equal_slices_of_the_concatenated_stream(lengths, context, stride):
    stream = np.arange(sum(lengths), dtype=np.uint32)
    shards = np.split(stream, np.cumsum(lengths)[:-1])
    if len(stream) < context + 1:
        with pytest.raises(InputError):
            SlidingWindowDataset(shards, context, stride)
        return
    ds = SlidingWindowDataset(shards, context, stride)
    starts = range(0, len(stream) - context, stride)
    assert len(ds) == len(starts)
    for i, start in enumerate(starts):
        x, y = ds[i]
        assert x.tolist() == stream[start : start + context].tolist()
        assert y.tolist() == stream[start + 1 : start + context + 1].tolist()


def test_window_needs_context_plus_one_tokens():
    assert len(SlidingWindowDataset(SHARDS, context_length=29)) == 1
    assert len(SlidingWindowDataset(np.arange(30), context_length=29)) == 1  # one array is one shard
    with pytest.raises(InputError, match="30 tokens are too few for one window of context 30"):
        SlidingWindowDataset(SHARDS, context_length=30)
    with pytest.raises(InputError, match="too few"):
        RandomWindowSampler(SHARDS, context_length=30)
    with pytest.raises(InputError, match="must be positive"):
        SlidingWindowDataset(SHARDS, context_length=4, stride=0)


def test_sliding_windows_through_a_dataloader():
    batches = list(DataLoader(SlidingWindowDataset(SHARDS, context_length=4), batch_size=3))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 4), (3, 4), (1, 4)]
    x, y = batches[1]
    assert torch.equal(y, x + 1)
    assert x[0].tolist() == [12, 13, 14, 15]


def test_random_windows_are_reproducible_and_in_bounds():
    a = RandomWindowSampler(SHARDS, context_length=6, seed=7)
    b = RandomWindowSampler(SHARDS, context_length=6, seed=7)
    c = RandomWindowSampler(SHARDS, context_length=6, seed=8)
    xa, ya = a.get_batch(16)
    xb, yb = b.get_batch(16)
    assert xa.shape == ya.shape == (16, 6) and xa.dtype == torch.int64
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, c.get_batch(16)[0])

    starts = set()
    for _ in range(50):
        x, y = a.get_batch(8)
        assert torch.equal(x, x[:, :1] + torch.arange(6))  # contiguous runs of the stream
        assert torch.equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(0, 24))  # every start from 0 to len - context - 1, none beyond


def test_random_windows_through_a_dataloader():
    def first_batches(seed):
        loader = DataLoader(RandomWindowSampler(SHARDS, context_length=5, seed=seed), batch_size=4)
        return [batch for batch, _ in zip(loader, range(3))]

    first, again = first_batches(3), first_batches(3)
    for (x, y), (x2, y2) in zip(first, again):
        assert x.shape == (4, 5)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(y, x + 1)


def test_windows_over_a_prepared_directory(tmp_path):
    from slmkit.tokenizer import train_bpe

    texts = [f"Line {i} of a small corpus about shards and windows." for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_bpe(texts, vocab_size=300)
    out = tmp_path / "shards"
    prepare([tmp_path / "d.jsonl"], tok, out, val_fraction=0.1, shard_tokens=500, progress=False)
    stream = np.concatenate(load_shards(out, "train")).astype(np.int64)
    assert len(load_shards(out, "train")) > 2

    ds = SlidingWindowDataset(out, context_length=32, stride=16)
    assert len(ds) == (len(stream) - 33) // 16 + 1
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert x.tolist() == stream[16 * i : 16 * i + 32].tolist()
        assert y.tolist() == stream[16 * i + 1 : 16 * i + 33].tolist()

    val = SlidingWindowDataset(out, context_length=8, split="val")
    val_stream = np.concatenate(load_shards(out, "val"))
    assert val[0][0].tolist() == val_stream[:8].tolist()

    # DataLoader workers started by spawn get a pickled copy: it names the files, not the tokens.
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 1000
    assert torch.equal(clone[3][0], ds[3][0])

    sampler = RandomWindowSampler(out, context_length=16, seed=0)
    x, y = sampler.get_batch(4)
    assert x.max() < tok.vocab_size and torch.equal(x[:, 1:], y[:, :-1])


def test_dataloader_workers_draw_different_windows():
    def batches():
        sampler = RandomWindowSampler(SHARDS, context_length=5, seed=0)
        loader = DataLoader(sampler, batch_size=8, num_workers=2)
        return [x for (x, _), _ in zip(loader, range(2))]  # batch 0 from worker 0, batch 1 from worker 1

    first, again = batches(), batches()
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
