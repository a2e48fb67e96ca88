"""BPE training: exact merges against a naive trainer, determinism, vocab layout, bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from slmkit.errors import SlmkitError, TokenizerError
from slmkit.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_bpe
from slmkit.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, compiled
from slmkit.tokenizer.train import count_words, learn_merges

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs!\n",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]\n",
    "Ünïcödé text, 中文分词测试, emoji 🙂🙂 and numbers 1234567 3.14159.\n",
    "aaabdaaabac aaabdaaabac   \n\n\tindented\r\nwindows line",
] * 3


def naive_merges(texts: list[str], pattern: str, n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair after every merge. Slow, obviously correct."""
    words = Counter(c.encode() for t in texts for c in compiled(pattern).findall(t))
    seqs = {w: list(w) for w in words}
    vocab = {i: bytes([i]) for i in range(256)}
    known = set(vocab.values())
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, seq in seqs.items():
            for p in zip(seq, seq[1:]):
                pairs[p] += words[w]
        candidates = [(c, p) for p, c in pairs.items() if vocab[p[0]] + vocab[p[1]] not in known]
        if not candidates:
            break
        best = max(candidates, key=lambda cp: (cp[0], -cp[1][0], -cp[1][1]))[1]
        new_id = 256 + len(merges)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        known.add(vocab[new_id])
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN])
def test_incremental_training_equals_naive_recount(pattern: str) -> None:
    words = count_words(CORPUS, pattern, workers=1)
    _, merges = learn_merges(words, 150)
    assert merges == naive_merges(CORPUS, pattern, 150)


def test_counting_on_all_cores_equals_one_core() -> None:
    big = ["".join(CORPUS) * 40]  # one long document, cut between lines into batches
    one = count_words(big, GPT4_PATTERN, workers=1, batch_chars=1000)
    two = count_words(big, GPT4_PATTERN, workers=2, batch_chars=1000)
    whole = Counter(c.encode() for c in compiled(GPT4_PATTERN).findall(big[0]))
    assert one == two == whole


def test_first_merge_is_most_frequent_pair() -> None:
    tok = train_bpe(["aaabdaaabac"], 256 + 3 + 4)
    assert tok.merges[0] == (ord("a"), ord("a"))  # "aa" occurs 4 times
    assert tok.vocab[256] == b"aa"


def test_vocab_layout_and_size() -> None:
    tok = train_bpe(CORPUS, 400, domain_tokens=["fox jumps", "tokenize"])
    assert tok.vocab_size == 400
    assert tok.vocab[:256] == [bytes([b]) for b in range(256)]
    assert list(tok.added_tokens.values()) == [394, 395]
    assert list(tok.special_tokens) == list(DEFAULT_SPECIAL_TOKENS)
    assert list(tok.special_tokens.values()) == [396, 397, 398, 399]
    assert tok.eot_id == 396 and tok.pad_id == 397


def test_training_is_deterministic() -> None:
    a = train_bpe(CORPUS, 380)
    b = train_bpe(list(CORPUS), 380)
    assert a.merges == b.merges and a.fingerprint() == b.fingerprint()


def test_domain_tokens_are_single_tokens() -> None:
    terms = ["fox jumps", "tokenize", "中文", "3.14159"]
    tok = train_bpe(CORPUS, 380, domain_tokens=terms)
    for term in terms:
        assert tok.encode(term) == [tok.added_tokens[term]]
        ids = tok.encode(f"see {term}, then {term}.")
        assert ids.count(tok.added_tokens[term]) == 2
        assert tok.decode(ids) == f"see {term}, then {term}."
    # domain terms were cut out of the statistics, so no merge spells "tokenize" by chance
    assert b"tokenize" not in tok.vocab[: tok.added_tokens["fox jumps"]]


def test_special_tokens_never_come_from_ordinary_text() -> None:
    tok = train_bpe(CORPUS + ["<|endoftext|> is special"] * 20, 400)
    text = "end <|endoftext|> here"
    with pytest.raises(TokenizerError, match="contains the special token '<|endoftext|>'"):
        tok.encode(text)
    as_special = tok.encode(text, allowed_special="all")
    assert tok.eot_id in as_special
    as_text = tok.encode(text, disallowed_special=())
    assert tok.eot_id not in as_text and tok.decode(as_text) == text
    assert tok.encode_ordinary(text) == as_text
    assert not set(tok.encode_ordinary(text)) & set(tok.special_tokens.values())
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.encode(text, allowed_special={"<|nope|>"})


def test_train_from_paths_and_directories(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(CORPUS[0] * 5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text(CORPUS[1] * 5)
    from_dir = train_bpe(tmp_path, 300)
    from_files = train_bpe([tmp_path / "a.txt", tmp_path / "sub" / "b.py"], 300)
    from_texts = train_bpe([CORPUS[0] * 5, CORPUS[1] * 5], 300)
    assert from_dir.merges == from_files.merges == from_texts.merges


def test_small_corpus_stops_when_pairs_run_out() -> None:
    tok = train_bpe(["ab ab ab"], 1000)
    assert tok.vocab_size < 1000 and tok.encode("ab ab") == [tok.vocab.index(b"ab"), tok.vocab.index(b" ab")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"corpus": CORPUS, "vocab_size": 259}, "vocab size 259 is too small"),
        ({"corpus": [], "vocab_size": 300}, "corpus is empty"),
        ({"corpus": "just one string", "vocab_size": 300}, "not a single string"),
    ],
)
def test_bad_training_input(kwargs: dict, message: str) -> None:
    with pytest.raises(SlmkitError, match=message):
        train_bpe(**kwargs)


def test_progress_bars_do_not_change_the_result(capsys: pytest.CaptureFixture) -> None:
    quiet = train_bpe(CORPUS, 320)
    loud = train_bpe(CORPUS, 320, progress=True)
    assert quiet.merges == loud.merges
    assert "merging" in capsys.readouterr().err


def test_tokenizer_requires_every_byte() -> None:
    with pytest.raises(TokenizerError, match="no token for 1 byte value"):
        Tokenizer([bytes([b]) for b in range(255)], [], GPT4_PATTERN)
