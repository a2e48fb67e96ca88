"""The quickstart: corpus choice, the parse check, and one short end-to-end run through the CLI."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from slmkit.cli import main
from slmkit.quickstart import default_corpus, function_body, parses

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_default_corpus_is_stdlib_code_without_tests() -> None:
    files = default_corpus()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages", "__pycache__"} & set(f.relative_to(STDLIB).parts) for f in files)
    assert STDLIB / "json" / "decoder.py" in files
    assert files == default_corpus()  # fixed order


@pytest.mark.parametrize(
    "completion, body, ok",
    [
        ("    return 1\n\nx = 2\n", "    return 1\n", True),
        ("    if a:\n        return b\n    retu", "    if a:\n        return b\n", True),
        ("    if a:\n    return (\n", "    if a:\n    return (\n", False),
        ("nonsense (\n", "\n", False),
    ],
)
def test_function_body_and_parse_check(completion: str, body: str, ok: bool) -> None:
    assert function_body(completion) == body
    assert parses("def f(a, b):\n" + body) is ok


def test_quickstart_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = [str(STDLIB / name) for name in ("json", "email", "logging", "asyncio")]
    out = tmp_path / "qs"
    args = ["quickstart", "--corpus", *corpus, "--out", str(out), "--minutes", "0.05", "--vocab-size", "512", "--samples", "2", "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for path in ("tokenizer/tokenizer.json", "data/manifest.json", "run/final/model.safetensors", "run/metrics.jsonl", "report.md"):
        assert (out / path).is_file(), path
    report = (out / "report.md").read_text()
    for key in ("val perplexity", "val bits per byte", "completions that parse", "slmkit chat"):
        assert key in report and key.split()[0] in printed
    assert main(args) == 2 and "already exists" in capsys.readouterr().err


def test_quickstart_from_a_base_model_keeps_its_tokenizer_and_reports_both(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from specialize_fixtures import tiny_model_dir

    base = tiny_model_dir(tmp_path / "base", context_length=128)
    out = tmp_path / "qs"
    corpus = [str(STDLIB / name) for name in ("json", "logging", "concurrent")]
    args = ["quickstart", "--base", str(base), "--corpus", *corpus, "--out", str(out), "--minutes", "0.05", "--samples", "2",
            "--eval-tokens", "3000", "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    before, after = report["evaluation"]["base"], report["evaluation"]["adapted"]
    assert before["tokens"] == after["tokens"] and 2900 < after["tokens"] <= 3000
    assert after["perplexity"] < before["perplexity"]  # a random base: any training helps
    assert "held-out perplexity" in printed and "->" in report["summary"]["held-out perplexity"]
    assert not (out / "tokenizer").exists() and (out / "data" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    train_config = json.loads((out / "run" / "train_config.json").read_text())
    assert (train_config["init"], train_config["seq_len"]) == (str(base), 128)
    assert main([*args[:-1], "--force", "--vocab-size", "512"]) == 2
    assert "--vocab-size trains a new tokenizer" in capsys.readouterr().err
