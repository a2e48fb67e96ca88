"""`slmkit quickstart`."""

from __future__ import annotations

import argparse


def cmd_quickstart(args: argparse.Namespace) -> None:
    from slmkit.quickstart import quickstart

    result = quickstart(
        args.out, args.corpus, base=args.base, minutes=args.minutes, vocab_size=args.vocab_size, samples=args.samples,
        eval_tokens=args.eval_tokens, seed=args.seed, force=args.force, progress=not args.quiet,
    )
    tokenizer = f"{result.out}/tokenizer" if args.base is None else f"{args.base}'s own"
    print(f"\n== tokenizer -> {tokenizer}")
    print(result.stats.table())
    print(f"\n== data -> {result.data.out}")
    print(result.data.summary_table())
    print(f"\n== model -> {result.out}/run/final")
    width = max(map(len, result.summary))
    for key, value in result.summary.items():
        print(f"{key:<{width}}  {value}")
    if result.samples:
        header, body, ok = result.samples[0]
        print(f"\na sample completion ({'parses' if ok else 'does not parse'}):\n{header}{body}")
    print(f"report: {result.out}/report.md")
    print(f"try it: slmkit generate {result.out}/run/final \"def read_config(path):\\n\" --max-new-tokens 80")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "quickstart", parents=[common], help="the whole path, tokenizer to trained model, in minutes",
        description="Train a tokenizer, prepare shards, pretrain a tiny model within a time budget, evaluate it "
                    "(perplexity, bits per byte, share of completions that parse) and write report.md. Without "
                    "--corpus it learns Python from this interpreter's standard library (~11 MB, tests excluded). "
                    "With --base it adapts a real model to the corpus instead (continued pretraining with the base "
                    "model's tokenizer) and reports base against adapted on held-out text.",
    )
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="your own corpus files or directories instead")
    p.add_argument("--base", metavar="MODEL", help="start from this model instead of from scratch: a model directory, a "
                                                   "GGUF file or an installed model (see `slmkit models`), e.g. "
                                                   "smollm2-135m-instruct")
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget (default: 8)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size, from scratch only (default: 4096)")
    p.add_argument("--samples", type=int, default=20, help="completions sampled for the parse check (default: 20)")
    p.add_argument("--eval-tokens", type=int, metavar="N",
                   help="score the first N held-out tokens (default: 16384 with --base, all of them from scratch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, training and sampling (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_quickstart)
