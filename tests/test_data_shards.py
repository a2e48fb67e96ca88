"""Token shards: layout, determinism, the split (long documents cut first), dedup on a real corpus,
the tokenizer kept beside the shards, and all-or-nothing output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_path  # what the `shared` fixture returns, usable at module scope
from slmkit.data import load_shards, prepare, read_manifest
from slmkit.data.clean import content_key
from slmkit.data.shards import MAX_DOC_CHARS, ShardWriter, cut_document, split_of, token_dtype
from slmkit.errors import InputError, OutputExistsError

PEPS = ("python-peps", "peps_final_active_accepted.jsonl")


class ByteTokenizer:
    """UTF-8 bytes as ids, plus an end-of-text id at the top of a vocabulary of any size."""

    def __init__(self, vocab_size: int = 300) -> None:
        self.vocab_size = vocab_size
        self.eot_id = vocab_size - 1

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def fingerprint(self) -> str:
        return f"bytes-{self.vocab_size}"

    def save(self, directory: Path) -> Path:
        (directory / "bytes-tokenizer.json").write_text(json.dumps({"vocab_size": self.vocab_size}))
        return directory


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def documents(stream: np.ndarray, eot: int) -> list[str]:
    """Split a ByteTokenizer stream back into its documents."""
    ends = np.flatnonzero(stream == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(stream[s:e].tolist()).decode("utf-8") for s, e in zip(starts, ends)]


def stream_of(out: Path, split: str) -> np.ndarray:
    return np.concatenate(load_shards(out, split))


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


DOCS = [f"Document number {i}: " + "some words " * (i % 7 + 1) for i in range(60)]


@pytest.fixture(scope="module")
def peps_docs():
    path = shared_path(*PEPS)
    return path, [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def bpe(peps_docs):
    from slmkit.tokenizer import train_bpe

    return train_bpe(peps_docs[1][:20], vocab_size=512)


@pytest.fixture(scope="module")
def peps_shards(tmp_path_factory, peps_docs, bpe):
    out = tmp_path_factory.mktemp("peps") / "shards"
    result = prepare([peps_docs[0]], bpe, out, seed=0, progress=False)
    return out, result


def test_token_dtype():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.lists(st.integers(0, 65535), max_size=30), max_size=8), shard_tokens=st.integers(1, 25))
def test_shard_writer_cuts_fixed_size_shards(tmp_path_factory, chunks, shard_tokens):
    out = tmp_path_factory.mktemp("writer")
    writer = ShardWriter(out, "train", np.dtype(np.uint16), shard_tokens)
    for chunk in chunks:
        writer.write(chunk)
    sizes = writer.close()
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"train_{i:06d}.npy" for i in range(len(sizes))]
    arrays = [np.load(f) for f in files]
    assert [len(a) for a in arrays] == sizes
    assert all(n == shard_tokens for n in sizes[:-1]) and all(0 < n <= shard_tokens for n in sizes)
    flat = [t for chunk in chunks for t in chunk]
    assert (np.concatenate(arrays).tolist() if arrays else []) == flat


@pytest.mark.parametrize(("vocab_size", "dtype"), [(300, np.uint16), (70_000, np.uint32)])
def test_layout_eot_and_counts(tmp_path, vocab_size, dtype):
    tok = ByteTokenizer(vocab_size)
    out = tmp_path / "shards"
    result = prepare([write_jsonl(tmp_path / "docs.jsonl", DOCS)], tok, out, val_fraction=0.2, shard_tokens=100, progress=False)

    manifest = read_manifest(out)
    assert manifest["dtype"] == np.dtype(dtype).name == result.dtype
    assert manifest["tokenizer"] == {"fingerprint": tok.fingerprint(), "vocab_size": vocab_size, "eot_id": tok.eot_id}
    val = [d for d in DOCS if split_of(d, 0, 0.2) == "val"]
    train = [d for d in DOCS if split_of(d, 0, 0.2) == "train"]
    assert 0 < len(val) < len(train)
    for split, docs in (("train", train), ("val", val)):
        shards = load_shards(out, split)
        assert all(isinstance(s, np.memmap) and s.dtype == dtype for s in shards)
        entries = manifest["splits"][split]["shards"]
        assert [e["file"] for e in entries] == [f"{split}_{i:06d}.npy" for i in range(len(shards))]
        assert [e["tokens"] for e in entries] == [len(s) for s in shards]
        assert all(len(s) == 100 for s in shards[:-1]) and 0 < len(shards[-1]) <= 100
        stream = np.concatenate(shards)
        assert manifest["splits"][split]["tokens"] == len(stream) == sum(len(d.encode()) + 1 for d in docs)
        assert manifest["splits"][split]["documents"] == len(docs)
        assert stream[-1] == tok.eot_id
        assert documents(stream, tok.eot_id) == docs  # end-of-text after every document, in corpus order
    assert manifest["sources"] == [{"path": (tmp_path / "docs.jsonl").as_posix(), "bytes": (tmp_path / "docs.jsonl").stat().st_size, "documents": 60}]
    assert manifest["filters"]["dedup"] == "exact"
    assert "exact_dedup" in manifest["cleaning"]["steps"]


def test_split_does_not_depend_on_order(tmp_path):
    tok = ByteTokenizer()
    a = prepare([write_jsonl(tmp_path / "a.jsonl", DOCS)], tok, tmp_path / "a", val_fraction=0.3, progress=False)
    b = prepare([write_jsonl(tmp_path / "b.jsonl", DOCS[::-1])], tok, tmp_path / "b", val_fraction=0.3, progress=False)
    assert a.splits["val"].documents == b.splits["val"].documents
    val_a = documents(stream_of(tmp_path / "a", "val"), tok.eot_id)
    val_b = documents(stream_of(tmp_path / "b", "val"), tok.eot_id)
    assert val_a == val_b[::-1]


def test_val_fraction_is_respected(tmp_path):
    docs = [f"record {i} with a little text" for i in range(2000)]
    result = prepare([write_jsonl(tmp_path / "d.jsonl", docs)], ByteTokenizer(), tmp_path / "out", val_fraction=0.2, progress=False)
    assert abs(result.splits["val"].documents - 400) < 70  # binomial sd is 18
    assert result.splits["train"].documents + result.splits["val"].documents == 2000

    result = prepare([tmp_path / "d.jsonl"], ByteTokenizer(), tmp_path / "none", val_fraction=0.0, progress=False)
    assert result.splits["val"].documents == 0
    with pytest.raises(InputError, match="split 'val' .* has no tokens"):
        load_shards(tmp_path / "none", "val")


def test_peps_are_reproducible(tmp_path, peps_docs, bpe, peps_shards):
    first, result = peps_shards
    again = tmp_path / "again"
    prepare([peps_docs[0]], bpe, again, seed=0, progress=False)
    assert files_of(again) == files_of(first)  # byte-identical shards and manifest

    other = tmp_path / "other"
    prepare([peps_docs[0]], bpe, other, seed=1, progress=False)
    manifest, other_manifest = read_manifest(first), read_manifest(other)
    assert other_manifest["splits"]["val"] != manifest["splits"]["val"]
    assert not np.array_equal(stream_of(other, "val"), stream_of(first, "val"))
    total = sum(s["documents"] for s in manifest["splits"].values())
    pieces = sum(len(cut_document(d, MAX_DOC_CHARS)) for d in peps_docs[1])
    assert total == sum(s["documents"] for s in other_manifest["splits"].values()) == pieces > 404


def test_peps_manifest_and_eot(peps_docs, bpe, peps_shards):
    out, result = peps_shards
    manifest = read_manifest(out)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["fingerprint"] == bpe.fingerprint()
    assert manifest["sources"][0]["documents"] == 404
    long = [d for d in peps_docs[1] if len(d) > MAX_DOC_CHARS]
    assert manifest["long_documents"] == {"max_chars": MAX_DOC_CHARS, "documents": len(long),
                                          "pieces": sum(len(cut_document(d, MAX_DOC_CHARS)) for d in long)}
    assert result.cut.documents == len(long) > 100  # half the PEPs are longer than 10,000 characters
    for split in ("train", "val"):
        info = manifest["splits"][split]
        stream = stream_of(out, split)
        assert info["tokens"] == len(stream) == sum(s["tokens"] for s in info["shards"])
        assert int((stream == bpe.eot_id).sum()) == info["documents"]  # ordinary text never encodes to EOT
        assert stream[-1] == bpe.eot_id
    pieces = sum(s["documents"] for s in manifest["splits"].values())
    assert abs(manifest["splits"]["val"]["documents"] - 0.05 * pieces) < 4 * (0.05 * 0.95 * pieces) ** 0.5

    train = stream_of(out, "train")
    first_train = next(p for d in peps_docs[1] for p in cut_document(d, MAX_DOC_CHARS) if split_of(p, 0, 0.05) == "train")
    first_eot = int(np.argmax(train == bpe.eot_id))
    assert bpe.decode(train[:first_eot].tolist()) == first_train

    table = result.summary_table()
    for word in ("nfc", "exact_dedup", "train", "val", "bytes/token", "uint16", f"{len(long)} over 10,000 chars"):
        assert word in table


# ---------------------------------------------------------------------------- long documents
def long_text(lines: int = 400) -> str:
    """Lines of 7 to 57 characters, a blank line after every seventh."""
    return "".join(f"line {i:03d} " + "word " * (i % 11) + ("\n\n" if i % 7 == 6 else "\n") for i in range(lines))


def test_cut_document_at_paragraph_then_line_breaks():
    text = long_text()
    pieces = cut_document(text, 1000)  # paragraphs are under 420 characters: one ends in every second half
    assert "".join(pieces) == text and len(pieces) == 16
    assert all(p.endswith("\n\n") and 500 < len(p) <= 1000 for p in pieces[:-1])
    for piece, after in zip(pieces, pieces[1:]):
        assert len(piece) + len(after.split("\n\n")[0]) + 2 > 1000  # the last paragraph break that fits

    lines = text.replace("\n\n", "\n")
    pieces = cut_document(lines, 1000)
    assert "".join(pieces) == lines
    for piece, after in zip(pieces, pieces[1:]):
        assert piece.endswith("\n") and len(piece) <= 1000 < len(piece) + len(after.split("\n")[0]) + 1

    assert cut_document("x" * 1234, 500) == ["x" * 500, "x" * 500, "x" * 234]  # no break: cut at the limit
    assert cut_document(text, len(text)) == [text]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab \n", max_size=300), max_chars=st.integers(1, 40))
def test_cut_pieces_concatenate_back(text, max_chars):
    pieces = cut_document(text, max_chars)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= max_chars for p in pieces) or pieces == [""]


def test_one_long_document_is_spread_over_both_splits(tmp_path):
    text = long_text()
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    tok = ByteTokenizer()
    result = prepare([tmp_path / "book.txt"], tok, tmp_path / "out", val_fraction=0.2, max_doc_chars=1000, progress=False)

    pieces = cut_document(text, 1000)
    val = documents(stream_of(tmp_path / "out", "val"), tok.eot_id)
    train = documents(stream_of(tmp_path / "out", "train"), tok.eot_id)
    assert val == [p for p in pieces if split_of(p, 0, 0.2) == "val"] and 0 < len(val) < len(train)
    assert train == [p for p in pieces if split_of(p, 0, 0.2) == "train"]
    assert read_manifest(tmp_path / "out")["long_documents"] == {"max_chars": 1000, "documents": 1, "pieces": 16}
    assert "long documents: 1 over 1,000 chars, cut into 16 pieces" in result.summary_table()

    whole = prepare([tmp_path / "book.txt"], tok, tmp_path / "whole", val_fraction=0.2, max_doc_chars=None, progress=False)
    assert whole.splits["train"].documents == 1 and whole.splits["val"].documents == 0
    assert "long documents: not cut" in whole.summary_table()
    with pytest.raises(InputError, match="max_doc_chars must be positive"):
        prepare([tmp_path / "book.txt"], tok, tmp_path / "bad", max_doc_chars=0)


def test_tinyshakespeare_gets_a_validation_split(tmp_path):
    path = shared_path("tinyshakespeare", "input.txt")
    result = prepare([path], ByteTokenizer(), tmp_path / "a", progress=False)  # one document of 1,115,394 chars
    assert result.cut.documents == 1 and result.cut.pieces == sum(s.documents for s in result.splits.values()) > 100
    val, train = result.splits["val"].tokens, result.splits["train"].tokens
    assert 0.03 < val / (val + train) < 0.07  # val_fraction 0.05 of ~114 pieces
    prepare([path], ByteTokenizer(), tmp_path / "b", progress=False)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")  # byte-identical


# ---------------------------------------------------------------------------- the tokenizer copy
def test_pretrain_finds_the_tokenizer_in_the_data_directory(tmp_path, capsys):
    from slmkit.cli import main
    from slmkit.tokenizer import Tokenizer, train_bpe
    from slmkit.train.recipe import TrainConfig
    from slmkit.train.setup import load_tokenizer

    text = long_text(2000)  # one document of about 70,000 characters
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    train_bpe([text], 300).save(tmp_path / "elsewhere" / "tok")
    data = tmp_path / "work" / "data"
    assert main(["data", "prepare", str(tmp_path / "book.txt"), "--tokenizer", str(tmp_path / "elsewhere" / "tok"),
                 "--out", str(data), "--val-fraction", "0.2", "-q"]) == 0
    assert "long documents: 1 over 10,000 chars" in capsys.readouterr().out
    assert (data / "tokenizer.json").read_bytes() == (tmp_path / "elsewhere" / "tok" / "tokenizer.json").read_bytes()

    small = [f"--set={k}={v}" for k, v in {"d_model": 32, "n_layers": 1, "n_heads": 2, "context_length": 32}.items()]
    assert main(["pretrain", "-q", "--data", str(data), "--out", str(tmp_path / "run"), *small, "--max-steps", "3",
                 "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1", "--save-every", "0", "--peak-flops", "1e11"]) == 0
    assert Tokenizer.load(tmp_path / "run" / "final").fingerprint() == read_manifest(data)["tokenizer"]["fingerprint"]

    # data prepared before the copy was kept: DATA/../tokenizer, else a one-line error
    (data / "tokenizer.json").unlink()
    (data / "tokenizer_config.json").unlink()
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run2"))
    with pytest.raises(InputError, match=r"no tokenizer given, none in .*data and none at .*tokenizer; pass --tokenizer"):
        load_tokenizer(cfg)
    (tmp_path / "elsewhere" / "tok").rename(tmp_path / "work" / "tokenizer")
    assert load_tokenizer(cfg).fingerprint() == read_manifest(data)["tokenizer"]["fingerprint"]


def test_planted_near_duplicate(tmp_path, peps_docs, bpe):
    docs = peps_docs[1][:40]
    planted = docs[7].replace("Python", "python", 1).replace(" the ", " a ", 3)
    assert planted != docs[7] and content_key(planted) != content_key(docs[7])
    path = write_jsonl(tmp_path / "peps.jsonl", [*docs, planted])

    exact = prepare([path], bpe, tmp_path / "exact", dedup="exact", progress=False)
    near = prepare([path], bpe, tmp_path / "near", dedup="near", progress=False)
    assert exact.cleaning.documents_out == 41
    assert exact.cleaning.steps["exact_dedup"].documents == 0
    assert near.cleaning.documents_out == 40
    assert near.cleaning.steps["near_dedup"].documents == 1
    assert near.cleaning.steps["near_dedup"].chars == len(planted)
    assert read_manifest(tmp_path / "near")["cleaning"]["steps"]["near_dedup"]["documents"] == 1


def test_existing_output_is_kept_unless_forced(tmp_path):
    corpus = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        prepare([corpus], ByteTokenizer(), out, progress=False)
    assert files_of(out) == {"keep.txt": b"mine"}

    prepare([corpus], ByteTokenizer(), out, force=True, progress=False)
    assert "keep.txt" not in files_of(out) and "manifest.json" in files_of(out) and "bytes-tokenizer.json" in files_of(out)


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [f"document {i} " + "text " * 400 for i in range(1000)])  # > 1 batch
    (corpus / "b.txt").write_bytes(b"not \xff UTF-8")
    saved = []
    monkeypatch.setattr(np, "save", lambda file, array: saved.append(file))  # record shard writes

    with pytest.raises(InputError, match=r"b\.txt is not valid UTF-8"):
        prepare([corpus], ByteTokenizer(), tmp_path / "out", shard_tokens=100_000, progress=False)
    assert saved  # shards were being written when the error came
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no temporary directory


def test_cleaning_everything_away_is_an_error(tmp_path):
    corpus = write_jsonl(tmp_path / "d.jsonl", ["short", "tiny"])
    with pytest.raises(InputError, match=r"cleaning removed all 2 documents \(min_chars 2\)"):
        prepare([corpus], ByteTokenizer(), tmp_path / "out", min_chars=100, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    corpus = write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(InputError, match="val_fraction"):
        prepare([corpus], ByteTokenizer(), tmp_path / "out", val_fraction=1.0)
    with pytest.raises(InputError, match="does not exist"):
        prepare([tmp_path / "missing"], ByteTokenizer(), tmp_path / "out")
    with pytest.raises(InputError, match="no manifest.json"):
        load_shards(tmp_path, "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
