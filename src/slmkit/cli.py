"""The `slmkit` command. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import slmkit
from slmkit.errors import InputError, SlmkitError

Handler = Callable[[argparse.Namespace], None]


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"domain-tokens file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    return [line.strip("\r\n") for line in lines if line.strip()]


# ---------------------------------------------------------------------------- tokenizer
def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from slmkit._io import atomic_dir
    from slmkit.data.corpus import Corpus
    from slmkit.errors import OutputExistsError
    from slmkit.tokenizer import train_bpe

    out = Path(args.out)
    if out.exists() and not args.force:  # fail before the (possibly long) training
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    domain = _read_lines(args.domain_tokens) if args.domain_tokens else []
    start = time.perf_counter()
    tok = train_bpe(
        Corpus(args.paths, text_field=args.text_field, errors=args.errors),
        args.vocab_size,
        pattern=args.pattern,
        special_tokens=args.special_tokens,
        domain_tokens=domain,
        progress=not args.quiet,
    )
    with atomic_dir(out, force=args.force) as tmp:
        tok.save(tmp)
    print(
        f"trained {tok.vocab_size:,} tokens ({len(tok.merges):,} merges, {len(tok.added_tokens)} domain, "
        f"{len(tok.special_tokens)} special) in {time.perf_counter() - start:.1f}s -> {out}/tokenizer.json"
    )
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge before reaching {args.vocab_size:,} tokens")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from slmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = tok.encode(args.text, allowed_special="all" if args.allow_special else ())
    print(" ".join(map(str, ids)))
    print(" ".join(repr(tok.token_piece(i)) for i in ids))
    print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes")


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    from slmkit.data.corpus import Corpus
    from slmkit.tokenizer import Tokenizer
    from slmkit.tokenizer.stats import tokenizer_stats

    tok = Tokenizer.load(args.tokenizer)
    texts = Corpus(args.paths, text_field=args.text_field, errors=args.errors)
    print(tokenizer_stats(tok, texts, top=args.top, progress=not args.quiet).table())


# ---------------------------------------------------------------------------- data
def cmd_data_prepare(args: argparse.Namespace) -> None:
    from slmkit.data import prepare
    from slmkit.tokenizer import Tokenizer

    result = prepare(
        args.paths,
        Tokenizer.load(args.tokenizer),
        args.out,
        val_fraction=args.val_fraction,
        dedup=args.dedup,
        min_chars=args.min_chars,
        max_nonalnum_ratio=args.max_nonalnum_ratio,
        max_repeated_line_ratio=args.max_repeated_line_ratio,
        near_threshold=args.near_threshold,
        seed=args.seed,
        errors=args.errors,
        text_field=args.text_field,
        force=args.force,
        progress=not args.quiet,
    )
    print(result.summary_table())
    print(f"wrote {args.out}/manifest.json")


# ---------------------------------------------------------------------------- quickstart
def cmd_quickstart(args: argparse.Namespace) -> None:
    from slmkit.quickstart import quickstart

    start = time.perf_counter()
    result = quickstart(args.out, args.corpus, vocab_size=args.vocab_size, seed=args.seed, force=args.force, progress=not args.quiet)
    print(f"\n== tokenizer: {result.tokenizer!r} -> {result.out}/tokenizer")
    print(result.stats.table())
    print(f"\n== data -> {result.data.out}")
    print(result.data.summary_table())
    print(f"\nquickstart finished in {time.perf_counter() - start:.1f}s")


# ---------------------------------------------------------------------------- parser
def _reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .csv/.tsv files to read (default: text)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="undecodable UTF-8: stop with an error naming the file (strict) or substitute U+FFFD (replace)")


def build_parser() -> argparse.ArgumentParser:
    from slmkit.tokenizer import DEFAULT_SPECIAL_TOKENS, PATTERNS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(
        prog="slmkit",
        description="Build and own a small, domain-specific language model: tokenizer, data, model, training, export, serving.",
        epilog="Run `slmkit COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"slmkit {slmkit.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # tokenizer
    tok = commands.add_parser("tokenizer", help="train, apply and measure byte-level BPE tokenizers",
                              description="Train, apply and measure byte-level BPE tokenizers (saved as HF tokenizer.json).")
    tok_cmds = tok.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = tok_cmds.add_parser("train", parents=[common], help="train a tokenizer on your corpus",
                            description="Train a byte-level BPE tokenizer on files and directories "
                                        "(.txt .md .rst .py .jsonl .csv .tsv) and save it as DIR/tokenizer.json.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="corpus files or directories")
    p.add_argument("--vocab-size", type=int, required=True, help="total tokens: 256 bytes + merges + domain + special")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--pattern", default="gpt4", choices=sorted(PATTERNS),
                   help="pre-tokenization split: gpt4 (GPT-4/Llama-3 style, default) or gpt2")
    p.add_argument("--special-tokens", nargs="+", default=list(DEFAULT_SPECIAL_TOKENS), metavar="TOKEN",
                   help=f"special tokens, never produced from ordinary text (default: {' '.join(DEFAULT_SPECIAL_TOKENS)})")
    p.add_argument("--domain-tokens", metavar="FILE", help="file of domain terms, one per line; each becomes a single token")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _reading_options(p)
    p.set_defaults(handler=cmd_tokenizer_train)

    p = tok_cmds.add_parser("encode", parents=[common], help="show the ids and pieces of a text",
                            description="Encode TEXT and print its token ids, then its pieces.")
    p.add_argument("tokenizer", metavar="DIR", help="tokenizer directory (or tokenizer.json)")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as special tokens")
    p.set_defaults(handler=cmd_tokenizer_encode)

    p = tok_cmds.add_parser("stats", parents=[common], help="measure a tokenizer on a corpus",
                            description="Bytes per token, tokens per word, share of the vocabulary used and the top tokens.")
    p.add_argument("tokenizer", metavar="DIR", help="tokenizer directory (or tokenizer.json)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="corpus files or directories")
    p.add_argument("--top", type=int, default=20, help="how many of the most frequent tokens to list (default: 20)")
    _reading_options(p)
    p.set_defaults(handler=cmd_tokenizer_stats)

    # data
    data = commands.add_parser("data", help="turn raw text into training-ready token shards",
                               description="Read, clean, deduplicate, split and tokenize corpora.")
    data_cmds = data.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = data_cmds.add_parser("prepare", parents=[common], help="clean, dedup, split and tokenize into .npy shards",
                             description="Clean, deduplicate, split (by document, seeded) and tokenize a corpus into "
                                         "memory-mapped .npy shards with a manifest.json.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="corpus files or directories")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation (default: 0.05)")
    p.add_argument("--dedup", choices=["none", "exact", "near"], default="exact",
                   help="remove exact duplicates, or also near-duplicates by MinHash LSH (default: exact)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity that counts as a near duplicate (default: 0.8)")
    p.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this (default: 1)")
    p.add_argument("--max-nonalnum-ratio", type=float, default=0.6, help="drop documents with more non-alphanumeric characters than this share (default: 0.6)")
    p.add_argument("--max-repeated-line-ratio", type=float, default=0.6, help="drop documents with more repeated lines than this share (default: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _reading_options(p)
    p.set_defaults(handler=cmd_data_prepare)
    # quickstart
    p = commands.add_parser("quickstart", parents=[common], help="run the whole path on a built-in corpus",
                            description="Train a tokenizer, measure it and prepare token shards. Without --corpus "
                                        "it uses packages of this Python's standard library (~3 MB of code).")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--corpus", nargs="+", metavar="PATH", help="your own corpus files or directories instead")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except SlmkitError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
