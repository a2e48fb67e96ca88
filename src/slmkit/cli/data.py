"""`slmkit data prepare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from slmkit.cli.common import reading_options, report_unreadable


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from slmkit.data import prepare
    from slmkit.tokenizer import Tokenizer

    result = prepare(
        args.paths,
        Tokenizer.load(args.tokenizer),
        args.out,
        val_fraction=args.val_fraction,
        max_doc_chars=args.max_doc_chars or None,
        dedup=args.dedup,
        min_chars=args.min_chars,
        max_nonalnum_ratio=args.max_nonalnum_ratio,
        max_repeated_line_ratio=args.max_repeated_line_ratio,
        near_threshold=args.near_threshold,
        seed=args.seed,
        errors=args.errors,
        text_field=args.text_field,
        skip_unreadable=args.skip_unreadable,
        force=args.force,
        progress=not args.quiet,
    )
    print(result.summary_table())
    report_unreadable([Path(p) for p in result.manifest["unreadable_skipped"]])
    print(f"wrote {args.out}/manifest.json")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    p.add_argument("--max-doc-chars", type=int, default=10_000, metavar="N",
                   help="cut longer documents into pieces at paragraph or line breaks before the split, so that "
                        "one long text still gets a validation share; 0 never cuts (default: 10000)")
    p.add_argument("--dedup", choices=["none", "exact", "near"], default="exact",
                   help="remove exact duplicates, or also near-duplicates by MinHash LSH (default: exact)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity that counts as a near duplicate (default: 0.8)")
    p.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this (default: 1)")
    p.add_argument("--max-nonalnum-ratio", type=float, default=0.6, help="drop documents with more non-alphanumeric characters than this share (default: 0.6)")
    p.add_argument("--max-repeated-line-ratio", type=float, default=0.6, help="drop documents with more repeated lines than this share (default: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    reading_options(p)
    p.set_defaults(handler=cmd_data_prepare)
