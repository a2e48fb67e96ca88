"""The quickstart: the whole slmkit path on a corpus every machine has.

With no corpus given it uses the source of the running Python's own standard library, test
folders excluded (about 11 MB of real code: a domain corpus that every machine with Python has,
no download needed): it trains a tokenizer with a few domain tokens, measures it, and prepares
train/val token shards.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from slmkit._io import atomic_dir
from slmkit.data import prepare
from slmkit.data.corpus import Corpus
from slmkit.data.shards import PrepareResult
from slmkit.tokenizer import Tokenizer, train_bpe
from slmkit.tokenizer.stats import TokenizerStats, tokenizer_stats

# Folders of tests, vendored or generated code, and demos: not the code we want a model to learn.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo", "pydoc_data"}
PYTHON_DOMAIN_TOKENS = ("__init__", "__name__", "async def", "isinstance", "    def ", "self.")


def default_corpus() -> list[Path]:
    """The .py files of the standard library, in a fixed order."""
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith((".", "config-")))
        files += [Path(root, name) for name in sorted(names) if name.endswith(".py")]
    return files


@dataclass
class QuickstartResult:
    out: Path
    tokenizer: Tokenizer
    stats: TokenizerStats
    data: PrepareResult


def quickstart(
    out: str | os.PathLike = "runs/quickstart",
    corpus: Sequence[str | os.PathLike] | None = None,
    *,
    vocab_size: int = 4096,
    domain_tokens: Sequence[str] = PYTHON_DOMAIN_TOKENS,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> QuickstartResult:
    """Train a tokenizer on `corpus`, measure it, and write token shards: `out/tokenizer`, `out/data`."""
    paths = [Path(p) for p in corpus] if corpus else default_corpus()
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        corpus = Corpus(paths, errors="replace")  # a few stdlib files hold deliberate Latin-1 bytes
        tok = train_bpe(corpus, vocab_size, domain_tokens=domain_tokens, progress=progress)
        tok.save(tmp / "tokenizer")
        stats = tokenizer_stats(tok, corpus, top=10, progress=progress)
        data = prepare(paths, tok, tmp / "data", dedup="near", seed=seed, errors="replace", progress=progress)
    return QuickstartResult(out, tok, stats, dataclasses.replace(data, out=out / "data"))
