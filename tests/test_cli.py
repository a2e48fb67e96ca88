"""The `slmkit` command: help texts, the happy paths, and bad input as one line + exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import slmkit
from slmkit.cli import build_parser, main

TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n" + "\n".join(
    f"Line {i}: item_{i} costs {i * 7} coins, the fox said to dog number {i % 13}." for i in range(300)
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(5):
        (root / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT[i * 7 :])
    return root


@pytest.fixture
def tokenizer_dir(tmp_path: Path, corpus: Path) -> Path:
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out), "-q"]) == 0
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["tokenizer", "data", "quickstart"]),
        (["tokenizer"], ["train", "encode", "stats"]),
        (["tokenizer", "train"], ["--vocab-size", "--pattern", "--domain-tokens", "--special-tokens", "--force"]),
        (["tokenizer", "encode"], ["--allow-special"]),
        (["tokenizer", "stats"], ["--top"]),
        (["data"], ["prepare"]),
        (["data", "prepare"], ["--tokenizer", "--val-fraction", "--dedup", "--min-chars", "--seed", "--errors"]),
        (["quickstart"], ["--corpus", "--out"]),
    ],
)
def test_every_command_explains_itself(capsys: pytest.CaptureFixture, command: list[str], expected: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"slmkit {slmkit.__version__}"


def test_train_encode_stats(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("lazy dog\nliquor jugs\n\n")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "320", "--out", str(out), "--domain-tokens", str(terms), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert "trained 320 tokens" in capsys.readouterr().out

    assert main(["tokenizer", "encode", str(out), "the lazy dog"]) == 0
    ids_line, pieces_line, count_line = capsys.readouterr().out.splitlines()
    assert "'lazy dog'" in pieces_line and count_line.startswith(f"{len(ids_line.split())} tokens")

    assert main(["tokenizer", "stats", str(out), str(corpus), "-q", "--top", "3"]) == 0
    report = capsys.readouterr().out
    assert "bytes/token" in report and "tokens/word" in report and "vocab used" in report
    assert len(report.split("top tokens:")[1].strip().splitlines()) == 3


def test_encode_special_tokens(tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenizer", "encode", str(tokenizer_dir), "a <|endoftext|>"]) == 2
    assert "contains the special token '<|endoftext|>'" in capsys.readouterr().err
    assert main(["tokenizer", "encode", str(tokenizer_dir), "a <|endoftext|>", "--allow-special"]) == 0
    assert "'<|endoftext|>'" in capsys.readouterr().out


def test_data_prepare(tmp_path: Path, corpus: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--val-fraction", "0.2", "-q"]) == 0
    assert "train" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["dtype"] == "uint16"


def binary_file(tmp_path: Path) -> Path:
    path = tmp_path / "blob.txt"
    path.write_bytes(b"\x00\x01\x02binary\x00" * 100)
    return path


def empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    (path / "blank.txt").write_text("")
    return path


@pytest.mark.parametrize(
    "make_input, vocab, message",
    [
        (lambda tmp: tmp / "missing", "300", "does not exist"),
        (empty_dir, "300", "no documents found"),
        (binary_file, "300", "binary"),
        (lambda tmp: tmp / "corpus", "200", "vocab size 200 is too small"),
    ],
    ids=["missing-path", "empty-corpus", "binary-file", "vocab-too-small"],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture, make_input, vocab: str, message: str
) -> None:
    out = tmp_path / "out"
    code = main(["tokenizer", "train", str(make_input(tmp_path)), "--vocab-size", vocab, "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path: Path, corpus: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture) -> None:
    before = (tokenizer_dir / "tokenizer.json").read_bytes()
    args = ["tokenizer", "train", str(corpus), "--vocab-size", "290", "--out", str(tokenizer_dir), "-q"]
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tokenizer_dir / "tokenizer.json").read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert (tokenizer_dir / "tokenizer.json").read_bytes() != before
    assert leftovers(tmp_path) == []

    shards = tmp_path / "shards"
    shards.mkdir()
    assert main(["data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(shards), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err and list(shards.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(slmkit.SlmkitError):
        main(["--debug", "tokenizer", "train", str(tmp_path / "missing"), "--vocab-size", "300", "--out", str(tmp_path / "o")])


def test_console_script_exit_status(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "slmkit", "tokenizer", "train", str(tmp_path / "nope"), "--vocab-size", "300", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: input {tmp_path / 'nope'} does not exist; pass files or directories of text"]


def test_parser_builds_without_side_effects() -> None:
    assert build_parser().prog == "slmkit"
