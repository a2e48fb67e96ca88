"""Atomic outputs: all or nothing, with ordinary permissions."""

from __future__ import annotations

import stat

import pytest

from slmkit._io import atomic_dir, write_text_atomic
from slmkit.errors import OutputExistsError


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_dir_publishes_with_umask_permissions(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        write_text_atomic(tmp / "sub" / "config.json", "{}")
    assert (out / "sub" / "config.json").read_text() == "{}"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755  # umask 022 (set in conftest)
    assert mode(out / "sub" / "config.json") == 0o644


def test_failed_block_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(OutputExistsError, match="--force"), atomic_dir(tmp_path / "model"):
        pass
