"""The quickstart: the whole slmkit path, on a corpus every machine has, in minutes on a CPU.

With no corpus given it trains a Python code-completion model on the source of the running
Python's own standard library, test folders excluded (about 11 MB of real code; no download):

    tokenizer -> data shards -> pretrain (time budget) -> eval -> sample completions -> report.md

With `base` (a real model: a model directory, a GGUF file, or an installed model such as
`smollm2-135m-instruct`) it adapts that model to the corpus instead of training one from scratch:

    base model (+ its tokenizer) -> data shards -> eval base -> continue pretraining -> eval adapted -> report.md

Evaluation reports held-out perplexity, bits per byte (comparable across tokenizers), and the
share of sampled function bodies that make the function parse with `ast`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
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
from slmkit.errors import InputError
from slmkit.tokenizer import Tokenizer, train_bpe
from slmkit.tokenizer.stats import TokenizerStats, tokenizer_stats

# Folders of tests, vendored or generated code, and demos: not the code we want a model to learn.
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo", "pydoc_data"}
PYTHON_DOMAIN_TOKENS = ("__init__", "__name__", "async def", "isinstance", "    def ", "self.")
DEF_LINE = re.compile(r"^def [A-Za-z_]\w*\(.*\)( -> .+)?:\n", re.MULTILINE)
# Adapting a real model: windows far shorter than its context (SmolLM2's is 8192) keep a CPU step
# in seconds; a gentle learning rate moves a trained model toward the domain without undoing it.
BASE_SEQ_LEN, BASE_BATCH, BASE_LR, BASE_EVAL_TOKENS = 512, 4, 1e-4, 16384


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
    evaluation: dict[str, dict[str, float]] = field(default_factory=dict)  # "trained", or "base" and "adapted"


def quickstart(
    out: str | os.PathLike = "runs/quickstart",
    corpus: Sequence[str | os.PathLike] | None = None,
    *,
    base: str | os.PathLike | None = None,
    minutes: float = 8.0,
    vocab_size: int | None = None,
    domain_tokens: Sequence[str] = PYTHON_DOMAIN_TOKENS,
    samples: int = 20,
    eval_tokens: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> QuickstartResult:
    """Run every stage into `out/` (data/, run/ with run/final/, report.md and report.json; from
    scratch also tokenizer/). With `base`, the base model keeps its tokenizer and continues
    pretraining on the corpus; base and adapted are scored on the same held-out text, its first
    `eval_tokens` tokens (default 16384 with a base, all of it from scratch)."""
    paths = [Path(p) for p in corpus] if corpus else default_corpus()
    if base is not None and vocab_size is not None:
        raise InputError("--vocab-size trains a new tokenizer; with --base the base model's tokenizer is kept")
    if eval_tokens is not None and eval_tokens < 1:
        raise InputError(f"--eval-tokens must be at least 1, not {eval_tokens}")
    out = Path(out)
    start = time.perf_counter()
    with atomic_dir(out, force=force) as tmp:
        corpus_ = Corpus(paths, errors="replace")  # a few stdlib files hold deliberate Latin-1 bytes
        if base is None:
            result = _from_scratch(tmp, paths, corpus_, minutes, vocab_size or 4096, domain_tokens, samples,
                                   eval_tokens, seed, progress)
        else:
            result = _from_base(tmp, paths, corpus_, base, minutes, samples, eval_tokens or BASE_EVAL_TOKENS, seed,
                                progress)
        result.summary["time"] = f"{time.perf_counter() - start:.0f}s ({result.summary.pop('_prepared'):.0f}s to prepare)"
        write_text_atomic(tmp / "report.md", _report(result.summary, result.samples, out, base))
        write_text_atomic(tmp / "report.json", json.dumps({"summary": result.summary, "evaluation": result.evaluation},
                                                          indent=2) + "\n")
    result.out = out
    result.data = dataclasses.replace(result.data, out=out / "data")
    return result


def _from_scratch(tmp: Path, paths: list[Path], corpus_: Corpus, minutes: float, vocab_size: int,
                  domain_tokens: Sequence[str], samples: int, eval_tokens: int | None, seed: int,
                  progress: bool) -> QuickstartResult:
    """A new tokenizer and a `tiny` model trained on the corpus within `minutes`."""
    from slmkit.model.io import load
    from slmkit.train import TrainConfig, pretrain

    start = time.perf_counter()
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
    metrics, completions = evaluate_model(model, tok, val_docs, samples, seed, eval_tokens, progress=progress)
    summary = {
        "corpus": f"{len(paths)} path(s), {data.cleaning.documents_out:,} documents after cleaning",
        "tokenizer": f"{tok.vocab_size:,} tokens, {stats.bytes_per_token:.2f} bytes/token",
        "train tokens": f"{data.splits['train'].tokens:,} (val {data.splits['val'].tokens:,})",
        "model": f"tiny preset, {model.num_parameters():,} parameters",
        "training": _training_line(trained),
        "final train loss": round(trained.train_loss, 4),
        "val loss": round(metrics["nll"], 4),
        "val perplexity": round(metrics["perplexity"], 3),
        "val bits per byte": round(metrics["bits_per_byte"], 4),
        "completions that parse": f"{metrics['parse_rate']:.0%} of {len(completions)}",
        "_prepared": prepared,
    }
    return QuickstartResult(tmp, tok, stats, data, summary, completions, {"trained": metrics})


def _from_base(tmp: Path, paths: list[Path], corpus_: Corpus, base: str | os.PathLike, minutes: float, samples: int,
               eval_tokens: int, seed: int, progress: bool) -> QuickstartResult:
    """The base model continues pretraining on the corpus within `minutes`; base and adapted are
    scored on the same held-out documents."""
    from slmkit.model.io import load
    from slmkit.train import TrainConfig, pretrain

    start = time.perf_counter()
    base_dir = base_model_dir(base, tmp / "base")
    model, tok = load(base_dir, dtype="float32")
    stats = tokenizer_stats(tok, corpus_, top=10, progress=progress)
    data = prepare(paths, tok, tmp / "data", dedup="near", seed=seed, errors="replace", progress=progress)
    seq_len = min(BASE_SEQ_LEN, model.cfg.context_length)
    val_docs = _documents(load_shards(tmp / "data", "val"), tok)
    prepared = time.perf_counter() - start

    before, _ = evaluate_model(model, tok, val_docs, samples, seed, eval_tokens, seq_len, progress)
    steps = planned_steps(model.cfg, BASE_BATCH, minutes, seq_len)
    del model  # training loads its own float32 copy
    train = TrainConfig(
        data=str(tmp / "data"), out=str(tmp / "run"), init=str(base_dir), seq_len=seq_len, max_steps=steps,
        max_minutes=minutes, batch_size=BASE_BATCH, lr=BASE_LR, warmup_steps=max(1, steps // 10), weight_decay=0.0,
        eval_every=0, save_every=0, seed=seed,
    )
    trained = pretrain(train, progress=progress)
    model, tok = load(tmp / "run" / "final")
    after, completions = evaluate_model(model, tok, val_docs, samples, seed, eval_tokens, seq_len, progress)
    summary = {
        "corpus": f"{len(paths)} path(s), {data.cleaning.documents_out:,} documents after cleaning",
        "base model": f"{base} ({model.num_parameters():,} parameters), its tokenizer: {stats.bytes_per_token:.2f} bytes/token here",
        "train tokens": f"{data.splits['train'].tokens:,} (val {data.splits['val'].tokens:,})",
        "training": f"continued pretraining, windows of {seq_len} tokens: " + _training_line(trained),
        "held-out text": f"{int(after['tokens']):,} tokens of the val split, in windows of {seq_len}",
        "held-out perplexity": _change(before["perplexity"], after["perplexity"], 3),
        "held-out bits per byte": _change(before["bits_per_byte"], after["bits_per_byte"], 4),
        "completions that parse": f"{before['parse_rate']:.0%} -> {after['parse_rate']:.0%} of {len(completions)}",
        "_prepared": prepared,
    }
    return QuickstartResult(tmp, tok, stats, data, summary, completions, {"base": before, "adapted": after})


def base_model_dir(base: str | os.PathLike, target: Path) -> Path:
    """A model directory as it is, or a GGUF file / installed model (`slmkit models`) imported into `target`."""
    from slmkit.convert.import_gguf import from_gguf

    path = Path(base)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"--base {base} is a directory without config.json; give a model directory, a GGUF file "
                             "or the name of an installed model (see `slmkit models`)")
        return path
    return from_gguf(base, target)


def evaluate_model(model, tok: Tokenizer, docs: list[str], samples: int, seed: int, max_tokens: int | None = None,
                   context: int | None = None, progress: bool = False) -> tuple[dict[str, float], list[tuple[str, str, bool]]]:
    """Perplexity and bits per byte on the first `max_tokens` tokens of `docs` (all without it), and
    the share of sampled function bodies that parse (`sample_completions`)."""
    from slmkit.eval import perplexity_of_texts

    ppl = perplexity_of_texts(model, tok, _first_tokens(docs, tok, max_tokens), context=context, progress=progress)
    completions = sample_completions(model, tok, docs, samples, seed)
    parse_rate = sum(ok for *_, ok in completions) / max(len(completions), 1)
    return ({"tokens": ppl.tokens, "nll": ppl.nll, "perplexity": ppl.perplexity, "bits_per_byte": ppl.bits_per_byte,
             "parse_rate": parse_rate}, completions)


def _first_tokens(docs: list[str], tok: Tokenizer, max_tokens: int | None) -> list[str]:
    if max_tokens is None:
        return docs
    kept, total = [], 0
    for doc in docs:
        ids = tok.encode_ordinary(doc)
        if total + len(ids) >= max_tokens:
            kept.append(tok.decode(ids[: max_tokens - total]))
            break
        kept.append(doc)
        total += len(ids)
    return [d for d in kept if d]


def _training_line(trained) -> str:
    return (f"{trained.steps:,} steps, {trained.tokens:,} tokens, {trained.tokens_per_s:,.0f} tok/s, "
            f"MFU {trained.mfu:.1%}")


def _change(before: float, after: float, digits: int) -> str:
    return f"{before:.{digits}f} -> {after:.{digits}f} ({100 * (after / before - 1):+.1f}%)"


def planned_steps(cfg: ModelConfig, batch_size: int, minutes: float, seq_len: int | None = None, mfu: float = 0.55) -> int:
    """Steps that fit the time budget, from the measured matmul speed of the device training will
    use and the MFU the `tiny` preset reaches on a CPU (55-60% measured in fp32). The cosine schedule
    then decays over the run the budget allows; the budget itself (`max_minutes`) still stops
    training on time if the estimate is high."""
    import torch

    from slmkit.devices import resolve_device
    from slmkit.model import Transformer
    from slmkit.train.precision import resolve_precision
    from slmkit.train.run_metrics import flops_per_token, measure_peak_flops

    seq_len = seq_len or cfg.context_length
    with torch.device("meta"):
        per_token = flops_per_token(Transformer(cfg), seq_len)
    device = resolve_device("auto")
    peak = measure_peak_flops(device, resolve_precision("auto", device).dtype)
    seconds_per_step = batch_size * seq_len * per_token / (peak * mfu)
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


def _report(summary: dict[str, Any], completions: list[tuple[str, str, bool]], out: Path,
            base: str | os.PathLike | None) -> str:
    lines = ["# slmkit quickstart", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "![training loss](run/loss.png)", "", "## Sample completions", ""]
    for header, body, ok in completions[:5]:
        lines += [f"{'parses' if ok else 'does not parse'}:", "", "```python", header + body.rstrip(), "```", ""]
    chat = ("in its own chat template" if base is not None
            else "(a pretrained base model continues text; instruction tuning comes next)")
    again = f"--base {base} --corpus my_docs/" if base is not None else "--corpus my_docs/"
    lines += [
        "## Next",
        "",
        f"- Complete code: `slmkit generate {out}/run/final \"def read_config(path):\\n\" --max-new-tokens 80`",
        f"- Chat with it: `slmkit chat {out}/run/final` {chat}",
        f"- Your own corpus: `slmkit quickstart {again} --out runs/mine`",
        "",
    ]
    return "\n".join(lines)
