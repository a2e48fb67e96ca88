"""Encoding: exact round trips over arbitrary Unicode, and the fast path equal to the reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.errors import TokenizerError
from slmkit.tokenizer import Tokenizer, train_bpe

SAMPLES = [
    "Plain English prose, with punctuation: commas, semicolons; and 'quotes'.\n",
    "for i in range(10):\n    print(f\"{i:>4}\")  # code with    long   whitespace\n\n\n",
    "日本語のテキストと中文文本，한국어 텍스트도 있습니다。",
    "Emoji 👍🏽 families 👨‍👩‍👧 flags 🇺🇦 and ZWJ sequences.",
    "Combining marks: e\u0301 a\u0308 n\u0303; Arabic: مرحبا بالعالم; Hebrew: שלום עולם.",
    "Control\x00chars\x1b[31m and tabs\t\t\tand\r\nCRLF, numbers 1234567890 3.14159 1e-9.",
]
DOMAIN = ["asyncio", "__init__", "中文"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(SAMPLES * 4, 700, domain_tokens=DOMAIN)


@pytest.fixture(scope="module")
def ref(tok: Tokenizer) -> Tokenizer:
    return tok.with_backend("reference")


any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
tricky_text = st.lists(
    st.sampled_from([*SAMPLES, *DOMAIN, " ", "   ", "\n\n", "\t", "\x00", "\u200f", "\u0301", "'s", "'LL", "🙂", "<|", "|>"])
    | any_text,
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=any_text | tricky_text)
def test_roundtrip_and_reference_equals_fast(tok: Tokenizer, ref: Tokenizer, text: str) -> None:
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert ref.encode_ordinary(text) == ids
    assert tok.encode(text, disallowed_special=()) == ids


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.text(max_size=30) | st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00"]), max_size=6))
def test_surrogate_policy(tok: Tokenizer, ref: Tokenizer, parts: list[str]) -> None:
    """Surrogate code points cannot be UTF-8: valid pairs become their character, lone ones U+FFFD."""
    text = "".join(parts)
    expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == expected
    assert ref.encode_ordinary(text) == ids


def test_surrogate_examples(tok: Tokenizer) -> None:
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"


def test_batch_equals_single(tok: Tokenizer, ref: Tokenizer) -> None:
    texts = [s * k for k in range(1, 4) for s in SAMPLES] + ["asyncio and __init__ in 中文"] * 3 + [""]
    batch = tok.encode_ordinary_batch(texts)
    assert batch == [tok.encode_ordinary(t) for t in texts]
    assert batch == ref.encode_ordinary_batch(texts)
    assert tok.encode_ordinary_batch(texts, num_threads=1) == batch


def test_domain_tokens_take_the_longest_match() -> None:
    tok = train_bpe(SAMPLES, 600, domain_tokens=["py", "python", "python3"])
    ids = tok.encode("python3 python py")
    assert [tok.token_piece(i) for i in ids if i in tok.added_tokens.values()] == ["python3", "python", "py"]


def test_decode_rejects_unknown_ids(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="token id 99999 is outside the vocabulary"):
        tok.decode([1, 99999])


def test_partial_utf8_decodes_with_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("中")
    pieces = b"".join(tok.vocab[i] for i in ids)
    assert pieces == "中".encode()
    assert tok.decode([pieces[0]]) == "\ufffd"  # byte tokens have id == byte value
