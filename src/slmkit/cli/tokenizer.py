"""`slmkit tokenizer train | encode | stats`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slmkit.cli.common import check_writable, read_lines, reading_options, report_unreadable


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from slmkit._io import atomic_dir
    from slmkit.data.corpus import Corpus
    from slmkit.errors import OutputExistsError
    from slmkit.tokenizer import train_bpe

    out = Path(args.out)
    if out.exists() and not args.force:  # fail before the (possibly long) training
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    check_writable(args.out)
    domain = read_lines(args.domain_tokens) if args.domain_tokens else []
    start = time.perf_counter()
    corpus = Corpus(args.paths, text_field=args.text_field, errors=args.errors, skip_unreadable=args.skip_unreadable)
    tok = train_bpe(
        corpus,
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
    report_unreadable(corpus.unreadable)
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
    texts = Corpus(args.paths, text_field=args.text_field, errors=args.errors, skip_unreadable=args.skip_unreadable)
    print(tokenizer_stats(tok, texts, top=args.top, progress=not args.quiet).table())


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.tokenizer import DEFAULT_SPECIAL_TOKENS, PATTERNS

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
    reading_options(p)
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
    reading_options(p)
    p.set_defaults(handler=cmd_tokenizer_stats)

