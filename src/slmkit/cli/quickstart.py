"""`slmkit quickstart`."""

from __future__ import annotations

import argparse
import time


def cmd_quickstart(args: argparse.Namespace) -> None:
    from slmkit.quickstart import quickstart

    start = time.perf_counter()
    result = quickstart(args.out, args.corpus, vocab_size=args.vocab_size, seed=args.seed, force=args.force, progress=not args.quiet)
    print(f"\n== tokenizer: {result.tokenizer!r} -> {result.out}/tokenizer")
    print(result.stats.table())
    print(f"\n== data -> {result.data.out}")
    print(result.data.summary_table())
    print(f"\nquickstart finished in {time.perf_counter() - start:.1f}s")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("quickstart", parents=[common], help="run the whole path on a built-in corpus",
                            description="Train a tokenizer, measure it and prepare token shards. Without --corpus "
                                        "it uses the source of this Python's standard library (~11 MB of code, tests excluded).")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="your own corpus files or directories instead")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_quickstart)
