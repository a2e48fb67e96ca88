"""User-caused failures of the CLI: one line naming the path and the cause, exit 2, no traceback,
nothing half-written.

Unreadable paths need a process that file permissions bind. Tests run as root in CI, and root
reads everything through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH; there the CLI runs under
`setpriv` with those two capabilities dropped, and each test first checks that the path really
is unreadable (or unwritable) to that process, skipping with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import TEXT
from tiny_models import model_dir as make_model_dir

from slmkit.cli import main

DROP = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def as_user(*argv: str) -> subprocess.CompletedProcess:
    """Run a command the way an ordinary user would: file permissions apply, root or not."""
    if DROP and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return subprocess.run([*DROP, *argv], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def slmkit(*args: str) -> subprocess.CompletedProcess:
    return as_user(sys.executable, "-m", "slmkit", *args)


def assert_one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert "Traceback" not in result.stderr


def forbid(path: Path, mode: int = 0) -> Path:
    """chmod `path` and check that a permission-bound process really cannot read it (mode 0) or
    write into it (a read-only folder)."""
    path.chmod(mode)
    if mode:
        probe = f"import os; f = os.path.join({str(path)!r}, '.probe'); open(f, 'w').close(); os.remove(f)"
    elif path.is_dir():
        probe = f"import os; os.listdir({str(path)!r})"
    else:
        probe = f"open({str(path)!r}, 'rb').read(1)"
    if as_user(sys.executable, "-c", probe).returncode == 0:
        pytest.skip(f"{path} stays accessible to this user with mode {mode:o}; the failure cannot be produced here")
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        (root / f"doc{i}.txt").write_text(f"Document {i}.\n" + TEXT.replace("fox", f"fox {i}"))
        (root / "sub" / f"more{i}.txt").write_text(f"More {i}.\n" + TEXT.replace("dog", f"dog {i}"))
    return root


@pytest.fixture
def tokenizer_dir(tmp_path: Path, corpus: Path) -> Path:
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(out), "-q"]) == 0
    return out


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "model", steps=0)


# ---------------------------------------------------------------------------- unreadable inputs
def test_tokenizer_train_on_an_unreadable_file(tmp_path, corpus):
    doc = forbid(corpus / "doc1.txt")
    result = slmkit("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "out"), "-q")
    assert_one_line(result, f"cannot read {doc}: permission denied; fix its permissions or skip what cannot be read "
                            "with --skip-unreadable (skip_unreadable=True)")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_data_prepare_on_an_unreadable_file(tmp_path, corpus, tokenizer_dir):
    doc = forbid(corpus / "doc2.txt")
    result = slmkit("data", "prepare", str(doc), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "shards"), "-q")
    assert_one_line(result, f"cannot read {doc}: permission denied; fix its permissions or skip what cannot be read "
                            "with --skip-unreadable (skip_unreadable=True)")
    assert not (tmp_path / "shards").exists() and leftovers(tmp_path) == []


def test_an_unreadable_subfolder_fails_unless_skipped(tmp_path, corpus, tokenizer_dir):
    sub = forbid(corpus / "sub")
    out = tmp_path / "shards"
    result = slmkit("data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "-q")
    assert_one_line(result, f"cannot read {sub}: permission denied; fix its permissions or skip what cannot be read "
                            "with --skip-unreadable (skip_unreadable=True)")
    assert not out.exists() and leftovers(tmp_path) == []

    result = slmkit("data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), "-q",
                    "--skip-unreadable")
    assert result.returncode == 0, result.stderr
    assert f"skipped 1 unreadable path (first: {sub})" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unreadable_skipped"] == [sub.as_posix()]
    assert sorted(Path(s["path"]).name for s in manifest["sources"]) == ["doc0.txt", "doc1.txt", "doc2.txt"]


def test_an_unreadable_folder_says_so_not_no_documents(tmp_path, corpus):
    forbid(corpus)
    result = slmkit("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "out"), "-q")
    assert_one_line(result, f"cannot read {corpus}: permission denied; fix its permissions or skip what cannot be read "
                            "with --skip-unreadable (skip_unreadable=True)")


def test_a_symlink_loop_says_so_not_does_not_exist(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    code = main(["tokenizer", "train", str(loop), "--vocab-size", "300", "--out", str(tmp_path / "out"), "-q"])
    assert code == 2
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    result = slmkit("tokenizer", "train", str(broken), "--vocab-size", "300", "--out", str(tmp_path / "out"), "-q")
    assert_one_line(result, f"input {broken} is a broken symbolic link (to {tmp_path / 'nowhere'})")
    result = slmkit("tokenizer", "train", str(loop), "--vocab-size", "300", "--out", str(tmp_path / "out"), "-q")
    assert_one_line(result, f"input {loop} is a loop of symbolic links; point it at a file or directory")


def test_an_unreadable_weights_file_is_not_called_missing(model):
    weights = forbid(model / "model.safetensors")
    result = slmkit("generate", str(model), "hello", "--max-new-tokens", "2")
    assert_one_line(result, f"cannot read {weights}: permission denied")


# ---------------------------------------------------------------------------- unwritable outputs
@pytest.mark.parametrize("command", ["tokenizer", "data"])
def test_an_unwritable_out_parent(tmp_path, corpus, tokenizer_dir, command):
    parent = tmp_path / "locked"
    parent.mkdir()
    forbid(parent, 0o555)
    out = parent / "out"
    args = (["tokenizer", "train", str(corpus), "--vocab-size", "300"] if command == "tokenizer"
            else ["data", "prepare", str(corpus), "--tokenizer", str(tokenizer_dir)])
    result = slmkit(*args, "--out", str(out), "-q")
    message = (f"cannot write {out}: permission denied ({parent}); choose a writable --out")
    assert_one_line(result, message)
    parent.chmod(0o755)
    assert list(parent.iterdir()) == []


# ---------------------------------------------------------------------------- undecodable and mistyped files
def test_convert_from_hf_on_a_non_utf8_config(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    out = tmp_path / "out"
    assert main(["convert", "from-hf", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {src / 'config.json'} is not UTF-8 text (invalid byte at offset 36); save it as UTF-8"]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("key, value, kind", [
    ("d_model", "big", "an integer"),
    ("n_layers", True, "an integer"),
    ("norm_eps", "small", "a number"),
    ("tie_embeddings", 1, "true or false"),
    ("rope_scaling", [2], "an object or null"),
])
def test_generate_on_a_mistyped_config(model, capsys, key, value, kind):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, key: value}))
    assert main(["generate", str(model), "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {model / 'config.json'}: config key {key!r} must be {kind}, not {value!r}"]


def test_set_overrides_are_type_checked_too(tmp_path, capsys):
    from slmkit.config import ModelConfig
    from slmkit.errors import InputError

    with pytest.raises(InputError, match="config key 'n_heads' must be an integer, not 'four'"):
        ModelConfig.from_preset("tiny", n_heads="four")
    with pytest.raises(InputError, match="config key 'd_model' must be an integer, not 1.5"):
        ModelConfig.from_preset("tiny").replace(d_model=1.5)
