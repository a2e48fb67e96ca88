"""Perplexity and bits-per-byte: exact values on a uniform model, and the sliding-window schedule."""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.eval import perplexity, perplexity_of_texts
from slmkit.eval.perplexity import windows
from slmkit.model import Transformer
from slmkit.tokenizer import train_bpe

TEXT = "the cat sat on the mat. the dog sat on the log. naïve café 日本. " * 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], 300)


def tiny_model(vocab_size: int, context_length: int = 32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, context_length=context_length, tie_embeddings=False)
    return Transformer(cfg).eval()


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size(tokenizer, tmp_path):
    model = tiny_model(tokenizer.vocab_size)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: each token has probability 1 / V
    path = tmp_path / "doc.txt"
    path.write_text(TEXT, encoding="utf-8")
    result = perplexity(model, tokenizer, [path], context=16, stride=8)
    n_tokens = len(tokenizer.encode_ordinary(TEXT))
    n_bytes = len(TEXT.encode("utf-8"))
    assert result.tokens == n_tokens and result.bytes == n_bytes and result.documents == 1
    vocab = tokenizer.vocab_size
    assert result.nll == pytest.approx(math.log(vocab), rel=1e-5)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(n_tokens * math.log2(vocab) / n_bytes, rel=1e-5)


@pytest.mark.parametrize("n, context, stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (37, 8, 8), (5, 16, 8)])
def test_windows_score_every_token_once_with_the_most_context(n, context, stride):
    ids = list(range(100, 100 + n))
    scored = []
    for i, w in enumerate(windows(ids, context, stride)):
        assert len(w.ids) <= context and w.targets == [t + 1 for t in w.ids]
        new = w.targets[len(w.targets) - w.scored :]
        scored += new
        for target in new:  # context of a token = the window inputs before it
            seen = target - w.ids[0]
            assert seen == min(target - 100, context) or (i > 0 and seen >= context - stride)
    assert scored == ids[1:]


def reference_nll(model: Transformer, ids: list[int], context: int, stride: int) -> float:
    """Each scored token from its own forward pass over exactly the context its window gives it."""
    total = 0.0
    with torch.no_grad():
        for w in windows(ids, context, stride):
            for k in range(len(w.ids) - w.scored, len(w.ids)):
                logits = model(torch.tensor([w.ids[: k + 1]]))[0, -1]
                total -= torch.log_softmax(logits, -1)[w.targets[k]].item()
    return total


@pytest.mark.parametrize("context, stride, batch_size", [(32, 32, 1), (16, 5, 3), (16, 16, 8)])
def test_batched_windows_match_a_token_by_token_reference(tokenizer, context, stride, batch_size):
    model = tiny_model(tokenizer.vocab_size)
    docs = [TEXT[:150], TEXT[40:90], "a"]
    result = perplexity_of_texts(model, tokenizer, docs, context, stride, batch_size)
    expected = sum(reference_nll(model, [tokenizer.eot_id] + tokenizer.encode_ordinary(d), context, stride) for d in docs)
    assert result.tokens == sum(len(tokenizer.encode_ordinary(d)) for d in docs)
    assert result.nll * result.tokens == pytest.approx(expected, rel=1e-5)


def test_overlapping_windows_score_no_worse_than_disjoint_ones(tokenizer):
    """On a model that has learned the text, more context helps: stride < context gives the same
    or lower NLL than disjoint windows, over the same tokens."""
    model = tiny_model(tokenizer.vocab_size, context_length=64).train()
    ids = torch.tensor([tokenizer.eot_id] + tokenizer.encode_ordinary(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    disjoint = perplexity_of_texts(model, tokenizer, [TEXT], context=8, stride=8)
    sliding = perplexity_of_texts(model, tokenizer, [TEXT], context=8, stride=2)
    assert sliding.tokens == disjoint.tokens
    assert sliding.nll <= disjoint.nll
    assert disjoint.nll < math.log(tokenizer.vocab_size) / 2  # it did learn the text


def test_bad_settings_are_input_errors(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    for bad in ({"context": 33}, {"context": 8, "stride": 9}, {"stride": 0}, {"batch_size": 0}):
        with pytest.raises(InputError):
            perplexity_of_texts(model, tokenizer, [TEXT], **{"context": None, "stride": None, "batch_size": 8, **bad})
