"""The quickstart: the whole slmkit path on a corpus every machine has.

With no corpus given it uses a few packages of the running Python's own standard library (about
3 MB of real code, a domain corpus that needs no download): it trains a tokenizer with a few
domain tokens, measures it, and prepares train/val token shards.
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

STDLIB_PACKAGES = ("asyncio", "collections", "concurrent", "email", "http", "importlib", "json", "logging", "unittest", "urllib", "xml")
PYTHON_DOMAIN_TOKENS = ("__init__", "__name__", "async def", "isinstance", "    def ", "self.")


def default_corpus() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in STDLIB_PACKAGES if (stdlib / name).is_dir()]


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
        tok = train_bpe(Corpus(paths), vocab_size, domain_tokens=domain_tokens, progress=progress)
        tok.save(tmp / "tokenizer")
        stats = tokenizer_stats(tok, Corpus(paths), top=10, progress=progress)
        data = prepare(paths, tok, tmp / "data", dedup="near", seed=seed, progress=progress)
    return QuickstartResult(out, tok, stats, dataclasses.replace(data, out=out / "data"))
