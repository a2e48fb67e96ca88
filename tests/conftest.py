"""Shared fixtures: the datasets beside the repository, and tiny corpora built on the fly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run in parallel processes (pytest -n auto) on models far too small to use a second
# thread; torch threads on top of test processes oversubscribe the cores and make a tiny
# forward pass 10-40x slower. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.umask(0o022)  # file-permission tests expect the common default

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skip (or fail under SLMKIT_REQUIRE_SHARED=1) when absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared dataset {path} is not available"
        if os.environ.get("SLMKIT_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (SLMKIT_REQUIRE_SHARED=1)")
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """`shared("python-peps", "x.txt")` -> Path, skipping when the dataset is absent."""
    return shared_path


@pytest.fixture(scope="session")
def verdict(tmp_path_factory) -> Path:
    """the-verdict as paragraph documents -> token shards (vocab 512) with a tokenizer beside them."""
    from train_helpers import make_data

    text = shared_path("the-verdict", "the-verdict.txt").read_text(encoding="utf-8")
    return make_data(text, tmp_path_factory.mktemp("verdict"), 512)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct Q4_1, imported once through the CLI, by its installed name."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, "-m", "slmkit", "convert", "from-gguf", "smollm2-135m-instruct", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def assert_close(actual, expected, tol: float) -> None:
    """`actual` equals `expected` up to float32 rounding, which scales with the values compared:
    elementwise |actual - expected| <= tol * max(1, max |expected|). A bare `tol` is not enough for
    logits of size ~4: their sums run in another order on AVX-512 than on AVX2, and even an entry
    near 0 carries the rounding of the large terms it was summed from."""
    import torch

    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=0)
