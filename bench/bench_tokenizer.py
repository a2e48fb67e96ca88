"""Tokenizer benchmark: slmkit against Hugging Face `tokenizers`, same run, same machine.

Training: slmkit `train_bpe` vs HF `BpeTrainer` with the same vocabulary size, the same special
tokens and the same pre-tokenization (the GPT-4-style split regex, then byte-level), both given the
same list of documents (the file cut into blank-line-separated paragraphs; the cut is lossless).
Files are read once beforehand; only training is timed. Runs are interleaved (slmkit, HF, slmkit,
HF, ...) so that a burst of load on the shared machine hits both sides alike.

Encoding: the tokenizer slmkit trained on python-peps, saved as `tokenizer.json` and loaded by HF
`tokenizers.Tokenizer.from_file`, so every encoder applies the very same vocabulary, merges and
regex. Ids are checked identical (slmkit fast, slmkit reference, HF) before anything is timed.
Throughput is UTF-8 bytes of input / seconds, with ids returned as Python lists of ints.

    .venv/bin/python bench/bench_tokenizer.py --repeats 5
    .venv/bin/python bench/bench_tokenizer.py --quick            # smoke run, a few seconds
    .venv/bin/python bench/bench_tokenizer.py --out results.json # or results.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

import slmkit
from slmkit.tokenizer import DEFAULT_SPECIAL_TOKENS, GPT4_PATTERN, Tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
DATASETS = [  # (name, file under --data, vocab size)
    ("tinyshakespeare", "tinyshakespeare/input.txt", 4096),
    ("python-peps", "python-peps/peps_final_active_accepted.txt", 8192),
]
ENCODE_DATASET = "python-peps"


# ---------------------------------------------------------------------------- helpers
def paragraphs(text: str) -> list[str]:
    """Cut after every run of blank lines, before the next non-newline character. Lossless:
    `"".join(paragraphs(t)) == t`."""
    parts = re.split(r"(?<=\n\n)(?=[^\n])", text)
    assert "".join(parts) == text
    return [p for p in parts if p]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def load_str() -> str:
    la = os.getloadavg()
    return f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def rayon_threads() -> int:
    env = os.environ.get("RAYON_NUM_THREADS") or os.environ.get("RAYON_RS_NUM_CPUS")
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off"):
        return 1
    return int(env) if env else (os.cpu_count() or 1)


def hf_trainer_tokenizer(docs: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    """HF byte-level BPE set up exactly like slmkit's: GPT-4 split (isolated), then ByteLevel."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEFAULT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- training
def bench_training(name: str, text: str, vocab_size: int, repeats: int) -> dict:
    docs = paragraphs(text)
    n_bytes = len(text.encode("utf-8"))

    def slm() -> Tokenizer:
        return train_bpe(docs, vocab_size, pattern="gpt4", special_tokens=DEFAULT_SPECIAL_TOKENS)

    def hf() -> tokenizers.Tokenizer:
        return hf_trainer_tokenizer(docs, vocab_size)

    # Warm up both once (imports, page cache, Rayon pool), then interleave the timed runs.
    slm_tok, hf_tok = slm(), hf()
    slm_times, hf_times = [], []
    for _ in range(repeats):
        for fn, times in ((slm, slm_times), (hf, hf_times)):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)

    # Where slmkit's time goes: one extra run split into its two phases.
    from slmkit.tokenizer.train import count_words, learn_merges

    t0 = time.perf_counter()
    words = count_words(docs, GPT4_PATTERN, list(DEFAULT_SPECIAL_TOKENS))
    t1 = time.perf_counter()
    learn_merges(words, vocab_size - 256 - len(DEFAULT_SPECIAL_TOKENS))
    t2 = time.perf_counter()

    assert slm_tok.vocab_size == vocab_size and hf_tok.get_vocab_size() == vocab_size, (
        slm_tok.vocab_size, hf_tok.get_vocab_size())
    slm_med, hf_med = statistics.median(slm_times), statistics.median(hf_times)
    return {
        "dataset": name, "bytes": n_bytes, "documents": len(docs), "vocab_size": vocab_size,
        "slmkit_s": slm_med, "hf_s": hf_med, "ratio": slm_med / hf_med,
        "slmkit_runs": slm_times, "hf_runs": hf_times,
        "slmkit_count_s": t1 - t0, "slmkit_merge_s": t2 - t1, "distinct_chunks": len(words),
        "slmkit_threads": os.cpu_count() or 1, "hf_threads": rayon_threads(),
    }


# ---------------------------------------------------------------------------- encoding
def bench_encoding(text: str, vocab_size: int, repeats: int, slice_bytes: int) -> tuple[list[dict], dict]:
    paras = paragraphs(text)
    fast = train_bpe(paras, vocab_size, pattern="gpt4")
    ref = fast.with_backend("reference")
    with tempfile.TemporaryDirectory() as tmp:
        fast.save(tmp)
        hf = tokenizers.Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))

    # A ~slice_bytes prefix of whole paragraphs for the slow reference encoder.
    slice_parts, size = [], 0
    for p in paras:
        if size >= slice_bytes:
            break
        slice_parts.append(p)
        size += len(p.encode("utf-8"))
    piece = "".join(slice_parts)

    def hf_batch() -> list[list[int]]:
        return [e.ids for e in hf.encode_batch(paras, add_special_tokens=False)]

    def hf_batch_fast() -> list[list[int]]:
        return [e.ids for e in hf.encode_batch_fast(paras, add_special_tokens=False)]

    def hf_whole() -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    # ---- correctness first: abort loudly on any difference
    def check(label: str, got: object, want: object) -> None:
        if got != want:
            sys.exit(f"ABORT: ids differ: {label}. The benchmark would compare different work.")

    whole_ids = fast.encode_ordinary(text)
    check("slmkit fast (whole) vs HF encode (whole)", hf_whole(), whole_ids)
    batch_ids = fast.encode_ordinary_batch(paras)
    check("slmkit fast batch vs slmkit fast per paragraph", batch_ids, [fast.encode_ordinary(p) for p in paras])
    check("slmkit fast batch vs HF encode_batch", hf_batch(), batch_ids)
    check("slmkit fast batch vs HF encode_batch_fast", hf_batch_fast(), batch_ids)
    slice_ids = fast.encode_ordinary(piece)
    check("slmkit reference vs slmkit fast (slice)", ref.encode_ordinary(piece), slice_ids)
    check("HF encode vs slmkit fast (slice)", hf.encode(piece, add_special_tokens=False).ids, slice_ids)

    n_text = len(text.encode("utf-8"))
    n_piece = len(piece.encode("utf-8"))
    cpus = os.cpu_count() or 1
    cases = [  # (engine, method, input, bytes, threads, fn)
        ("slmkit fast (tiktoken)", "encode_ordinary", "whole text", n_text, 1, lambda: fast.encode_ordinary(text)),
        ("slmkit fast (tiktoken)", "encode_ordinary_batch", f"{len(paras):,} paragraphs", n_text, cpus,
         lambda: fast.encode_ordinary_batch(paras)),
        ("slmkit fast (tiktoken)", "encode_ordinary, loop", f"{len(paras):,} paragraphs", n_text, 1,
         lambda: [fast.encode_ordinary(p) for p in paras]),
        ("slmkit reference", "encode_ordinary", f"{n_piece / 1e3:.0f} KB slice", n_piece, 1,
         lambda: ref.encode_ordinary(piece)),
        ("HF tokenizers", "encode", "whole text", n_text, 1, hf_whole),
        ("HF tokenizers", "encode_batch", f"{len(paras):,} paragraphs", n_text, rayon_threads(), hf_batch),
        ("HF tokenizers", "encode_batch_fast", f"{len(paras):,} paragraphs", n_text, rayon_threads(), hf_batch_fast),
    ]
    rows = []
    for engine, method, what, nb, threads, fn in cases:
        med, runs = median_time(fn, repeats, warmup=0)  # the checks above ran each one once already
        rows.append({"engine": engine, "method": method, "input": what, "bytes": nb, "threads": threads,
                     "median_s": med, "mb_per_s": nb / med / 1e6, "runs": runs})
    info = {"bytes": n_text, "paragraphs": len(paras), "tokens": len(whole_ids),
            "bytes_per_token": n_text / len(whole_ids), "slice_bytes": n_piece}
    return rows, info


# ---------------------------------------------------------------------------- report
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__,
        "slmkit": getattr(slmkit, "__version__", "?"), "slmkit_tokenizer_src": source_digest(),
        "platform": platform.platform(),
    }


def source_digest() -> str:
    """A short hash of slmkit's tokenizer sources, so a result can be matched to the code it measured."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO / "src" / "slmkit" / "tokenizer").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        (
            f"Machine: {m['cpu']} ({m['cpu_count']} CPUs); python {m['python']}, torch {m['torch']}, "
            f"tokenizers {m['tokenizers']}, tiktoken {m['tiktoken']}, slmkit {m['slmkit']} "
            f"(tokenizer sources sha256 {m['slmkit_tokenizer_src']})"
        ),
        (
            f"Date: {res['date']}; repeats: {res['repeats']} (median); load average before {res['load_before']}, "
            f"after {res['load_after']}; wall time {res['wall_s']:.0f} s"
        ) + ("; QUICK smoke run" if res["quick"] else ""),
        "",
        "### Training (byte-level BPE, GPT-4 split regex, 4 special tokens)",
        "",
    ]
    rows = []
    for t in res["training"]:
        rows.append([
            t["dataset"], f"{t['bytes'] / 1e6:.2f} MB / {t['documents']:,} paragraphs", f"{t['vocab_size']:,}",
            f"{t['slmkit_s']:.3f}", f"{t['hf_s']:.3f}", f"**{t['ratio']:.2f}x**",
            f"{t['slmkit_count_s']:.2f} + {t['slmkit_merge_s']:.2f}",
            f"{t['slmkit_threads']} / {t['hf_threads']}",
        ])
    lines.append(table(
        ["corpus", "input", "vocab", "slmkit s", "HF s", "slmkit/HF", "slmkit count + merge s", "threads slmkit / HF"],
        rows))
    e = res["encoding_info"]
    lines += [
        "",
        (
            f"### Encoding python-peps ({e['bytes'] / 1e6:.2f} MB, {e['tokens']:,} tokens, "
            f"{e['bytes_per_token']:.2f} bytes/token; ids identical across all engines)"
        ),
        "",
    ]
    hf_best = max(r["mb_per_s"] for r in res["encoding"] if r["engine"].startswith("HF"))
    rows = [[r["engine"], f"`{r['method']}`", r["input"], str(r["threads"]), f"{r['median_s']:.3f}",
             f"**{r['mb_per_s']:.2f}**", f"{r['mb_per_s'] / hf_best:.2f}x"] for r in res["encoding"]]
    lines.append(table(["engine", "method", "input", "threads", "median s", "MB/s", "vs best HF"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="shared datasets directory")
    ap.add_argument("--out", type=Path, help="also write the results: .json for raw numbers, anything else Markdown")
    ap.add_argument("--quick", action="store_true", help="smoke run: small slices, 1 repeat")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else max(1, args.repeats)

    texts = {}
    for name, rel, _ in DATASETS:
        path = args.data / rel
        if not path.is_file():
            sys.exit(f"missing dataset {path}; pass --data DIR (the shared datasets directory)")
        text = path.read_text(encoding="utf-8")
        texts[name] = text[: 200_000] if args.quick else text

    t_start = time.perf_counter()
    res = {"date": dt.date.today().isoformat(), "repeats": repeats, "quick": args.quick,
           "machine": machine_info(), "load_before": load_str(), "command": " ".join(sys.argv)}
    res["training"] = []
    for name, _, vocab in DATASETS:
        v = 1024 if args.quick else vocab
        print(f"training {name} vocab {v} ...", file=sys.stderr, flush=True)
        res["training"].append(bench_training(name, texts[name], v, repeats))
    print("encoding ...", file=sys.stderr, flush=True)
    enc_vocab = next(v for n, _, v in DATASETS if n == ENCODE_DATASET)
    res["encoding"], res["encoding_info"] = bench_encoding(
        texts[ENCODE_DATASET], 1024 if args.quick else enc_vocab, repeats, 30_000 if args.quick else 300_000)
    res["load_after"] = load_str()
    res["wall_s"] = time.perf_counter() - t_start

    report = render(res)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps(res, indent=2) + "\n")
        else:
            args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
