"""The quickstart: the whole slmkit path, on a corpus every machine has, in minutes on a CPU.

With no corpus given it trains a Python code-completion model on the source of the running
Python's own standard library, test folders excluded (about 11 MB of real code; no download):

    tokenizer -> data shards -> pretrain (time budget) -> eval -> sample completions -> report.md

Evaluation reports held-out perplexity, bits per byte (comparable across tokenizers), and the
share of sampled function bodies that make the function parse with `ast`.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import re
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from slmkit._io import atomic_dir, write_text_atomic
from slmkit.config import ModelConfig
from slmkit.data import prepare
from slmkit.data.corpus import Corpus
from slmkit.data.shards import PrepareResult, load_shards
from slmkit.tokenizer import Tokenizer, train_bpe
from slmkit.tokenizer.stats import TokenizerStats, tokenizer_stats

# Folders of tests, vendored or generated code, and demos: not the code we want a model to learn.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo", "pydoc_data"}
PYTHON_DOMAIN_TOKENS = ("__init__", "__name__", "async def", "isinstance", "    def ", "self.")
DEF_LINE = re.compile(r"^def [A-Za-z_]\w*\(.*\)( -> .+)?:\n", re.MULTILINE)


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
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[str, str, bool]] = field(default_factory=list)  # (prompt, completion, parses)


def quickstart(
    out: str | os.PathLike = "runs/quickstart",
    corpus: Sequence[str | os.PathLike] | None = None,
    *,
    minutes: float = 8.0,
    vocab_size: int = 4096,
    domain_tokens: Sequence[str] = PYTHON_DOMAIN_TOKENS,
    samples: int = 20,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> QuickstartResult:
    """Run every stage into `out/` (tokenizer/, data/, run/ with run/final/, report.md)."""
    from slmkit.eval import perplexity_of_texts
    from slmkit.model.io import load
    from slmkit.train import TrainConfig, pretrain

    paths = [Path(p) for p in corpus] if corpus else default_corpus()
    out = Path(out)
    start = time.perf_counter()
    with atomic_dir(out, force=force) as tmp:
        corpus_ = Corpus(paths, errors="replace")  # a few stdlib files hold deliberate Latin-1 bytes
        tok = train_bpe(corpus_, vocab_size, domain_tokens=domain_tokens, progress=progress)
        tok.save(tmp / "tokenizer")
        stats = tokenizer_stats(tok, corpus_, top=10, progress=progress)
        data = prepare(paths, tok, tmp / "data", dedup="near", seed=seed, errors="replace", progress=progress)
        prepared = time.perf_counter() - start

        batch = 16
        steps = planned_steps(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size), batch, minutes)
        train = TrainConfig(
            data=str(tmp / "data"), out=str(tmp / "run"), tokenizer=str(tmp / "tokenizer"), preset="tiny",
            max_steps=steps, max_minutes=minutes, batch_size=batch, lr=2e-3, warmup_steps=min(100, steps // 10),
            eval_every=max(1, steps // 8), eval_batches=10, save_every=0, seed=seed,
        )
        trained = pretrain(train, progress=progress)
        model, tok = load(tmp / "run" / "final")

        val_docs = _documents(load_shards(tmp / "data", "val"), tok)
        ppl = perplexity_of_texts(model, tok, val_docs, progress=progress)
        completions = sample_completions(model, tok, val_docs, samples, seed)
        parse_rate = sum(ok for *_, ok in completions) / max(len(completions), 1)
        summary = {
            "corpus": f"{len(paths)} path(s), {data.cleaning.documents_out:,} documents after cleaning",
            "tokenizer": f"{tok.vocab_size:,} tokens, {stats.bytes_per_token:.2f} bytes/token",
            "train tokens": f"{data.splits['train'].tokens:,} (val {data.splits['val'].tokens:,})",
            "model": f"tiny preset, {model.num_parameters():,} parameters",
            "training": f"{trained.steps:,} steps, {trained.tokens:,} tokens, {trained.tokens_per_s:,.0f} tok/s, MFU {trained.mfu:.1%}",
            "final train loss": round(trained.train_loss, 4),
            "val loss": round(ppl.nll, 4),
            "val perplexity": round(ppl.perplexity, 3),
            "val bits per byte": round(ppl.bits_per_byte, 4),
            "completions that parse": f"{parse_rate:.0%} of {len(completions)}",
            "time": f"{time.perf_counter() - start:.0f}s (tokenizer + data {prepared:.0f}s)",
        }
        write_text_atomic(tmp / "report.md", _report(summary, completions, out))
    return QuickstartResult(out, tok, stats, dataclasses.replace(data, out=out / "data"), summary, completions)


def planned_steps(cfg: ModelConfig, batch_size: int, minutes: float, mfu: float = 0.55) -> int:
    """Steps that fit the time budget, from this machine's measured matmul speed and the MFU the
    `tiny` preset reaches on a CPU (55-60% measured in fp32). The cosine schedule then decays over the run the budget allows;
    the budget itself (`max_minutes`) still stops training on time if the estimate is high."""
    import torch

    from slmkit.model import Transformer
    from slmkit.train.run_metrics import flops_per_token, measure_peak_flops

    with torch.device("meta"):
        per_token = flops_per_token(Transformer(cfg))
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    seconds_per_step = batch_size * cfg.context_length * per_token / (peak * mfu)
    return max(10, int(minutes * 60 / seconds_per_step))


def _documents(shards, tok: Tokenizer) -> list[str]:
    """The documents of a split, recovered from its token shards (EOT-separated)."""
    docs, current = [], []
    for shard in shards:
        for token in shard.tolist():
            if token == tok.eot_id:
                docs.append(tok.decode(current))
                current = []
            else:
                current.append(token)
    return docs


def sample_completions(model, tok: Tokenizer, docs: list[str], n: int, seed: int) -> list[tuple[str, str, bool]]:
    """Prompt with top-level `def` lines of held-out code; check whether header + body parse."""
    from slmkit.generation import generate

    headers = sorted({m.group() for doc in docs for m in DEF_LINE.finditer(doc)})
    chosen = random.Random(seed).sample(headers, min(n, len(headers)))
    results = []
    for i, header in enumerate(chosen):
        completion = generate(model, tok, header, max_new_tokens=96, temperature=0.8, top_k=50, seed=seed + i)
        body = function_body(completion)
        results.append((header, body, parses(header + body)))
    return results


def function_body(completion: str) -> str:
    """The indented lines that follow a `def` header, up to the first dedent; an unfinished last
    line is dropped (the sample ran out of tokens, not of ideas)."""
    lines = completion.split("\n")
    if len(lines) > 1:
        lines = lines[:-1]
    body = []
    for line in lines:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _report(summary: dict[str, Any], completions: list[tuple[str, str, bool]], out: Path) -> str:
    lines = ["# slmkit quickstart", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "![training loss](run/loss.png)", "", "## Sample completions", ""]
    for header, body, ok in completions[:5]:
        lines += [f"{'parses' if ok else 'does not parse'}:", "", "```python", header + body.rstrip(), "```", ""]
    lines += [
        "## Next",
        "",
        f"- Complete code: `slmkit generate {out}/run/final \"def read_config(path):\\n\" --max-new-tokens 80`",
        f"- Chat with it: `slmkit chat {out}/run/final` (a pretrained base model continues text; instruction tuning comes next)",
        "- Your own corpus: `slmkit quickstart --corpus my_docs/ --out runs/mine`",
        "",
    ]
    return "\n".join(lines)
