"""HF formats: our tokenizer.json runs in `tokenizers` with identical ids, and tokenizers made by
`tokenizers` in the GPT-2, Llama-3 and Qwen2 layouts run in slmkit with identical ids."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from slmkit.errors import InputError, TokenizerError  # noqa: E402
from slmkit.tokenizer import GPT4_PATTERN, Tokenizer, train_bpe  # noqa: E402

from conftest import SHARED_DATA, shared_path  # noqa: E402

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
BUILTIN = [
    "Hello world! It's a test, isn't it? We'll see: 12345 + 678 = 13023.\n",
    "def f(x):\n    return x ** 2  # square\n\n\n\tclass A: pass\r\n",
    "Ünïcödé, e\u0301 (NFD), 中文, 日本語, 한국어, مرحبا, 👍🏽👨‍👩‍👧 <|endoftext|> <|im_start|>user\n",
]
CORPORA = sorted(
    p.relative_to(SHARED_DATA).as_posix() for p in SHARED_DATA.glob("*/*") if p.is_file() and p.name != "README.md"
) or ["python-peps/peps_final_active_accepted.txt"]  # absent data still yields a (skipping) case
MAX_CHARS = 600_000  # per corpus: every kind of chunk it has, in seconds (HF encodes at ~1.5 MB/s here)


def read_corpus(relative: str) -> list[str]:
    """A corpus file as raw text (gz decompressed), in blocks of 20 lines."""
    path = shared_path(*relative.split("/"))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8")[:MAX_CHARS].splitlines(keepends=True)
    return ["".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]


def hf_ids(hf: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def assert_same_ids(ours: Tokenizer, hf: tokenizers.Tokenizer, texts: list[str]) -> None:
    mine = ours.encode_batch(texts, allowed_special="all")
    theirs = hf_ids(hf, texts)
    for text, a, b in zip(texts, mine, theirs):
        assert a == b, f"ids differ on {text[:80]!r}"
    assert [ours.decode(ids) for ids in mine[:50]] == [hf.decode(ids, skip_special_tokens=False) for ids in theirs[:50]]


def hf_trained(style: str, texts: list[str], vocab_size: int = 1500) -> tokenizers.Tokenizer:
    """A tokenizer made by `tokenizers` itself, laid out like GPT-2, Llama 3 or Qwen2."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style == "gpt2":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>"]
    elif style == "llama3":
        tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"), byte_level])
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    else:
        tok = tokenizers.Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"), byte_level])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# ------------------------------------------------------------------ slmkit -> tokenizers
@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_saved_tokenizer_json_loads_in_tokenizers(tmp_path: Path, pattern: str) -> None:
    tok = train_bpe(BUILTIN * 5, 400, pattern=pattern, domain_tokens=["isn't it", "中文"])
    tok.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size
    assert_same_ids(tok, hf, BUILTIN + ["isn't it 中文 isn't it"])
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint() == tok.fingerprint() and again.merges == tok.merges
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"


@pytest.mark.parametrize("corpus", CORPORA)
def test_parity_with_tokenizers_on_shared_corpus(tmp_path: Path, corpus: str, imported: dict) -> None:
    texts = read_corpus(corpus)
    ours = train_bpe(texts[:200], 1024)
    ours.save(tmp_path)
    assert_same_ids(ours, tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), texts)
    for hf, loaded in imported.values():
        assert_same_ids(loaded, hf, texts)


# ------------------------------------------------------------------ tokenizers -> slmkit
@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """HF-trained tokenizers of each layout, with slmkit's loaded copy of each."""
    sample = [t for name in ("tinyshakespeare/input.txt", "python-peps/peps_final_active_accepted.txt")
              if (SHARED_DATA / name).exists() for t in read_corpus(name)[:300]]
    out = {}
    for style in ("gpt2", "llama3", "qwen2"):
        hf = hf_trained(style, BUILTIN * 20 + sample)
        directory = tmp_path_factory.mktemp(style)
        hf.save(str(directory / "tokenizer.json"))
        out[style] = (hf, Tokenizer.load(directory))
    return out


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2"])
def test_imported_tokenizer_json(imported: dict, style: str) -> None:
    hf, ours = imported[style]
    assert ours.vocab_size == hf.get_vocab_size()
    assert_same_ids(ours, hf, BUILTIN + ["e\u0301\u0308 1234567 don'T"])
    assert ours.with_backend("reference").encode_batch(BUILTIN, allowed_special="all") == hf_ids(hf, BUILTIN)
    if style == "qwen2":
        assert ours.normalizer == "nfc" and ours.encode("e\u0301") == ours.encode("\u00e9")


def test_gpt2_vocab_and_merges_files(tmp_path: Path) -> None:
    hf = hf_trained("gpt2", BUILTIN * 20)
    hf.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    ours = Tokenizer.load(tmp_path)
    assert ours.eot_token == "<|endoftext|>"
    assert_same_ids(ours, hf, BUILTIN)


def test_unsupported_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(InputError, match="neither tokenizer.json nor vocab.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    wordpiece = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="model type 'WordPiece' is not supported"):
        Tokenizer.load(tmp_path)
