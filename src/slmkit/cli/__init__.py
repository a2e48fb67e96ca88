"""The `slmkit` command. Each subcommand module registers its parsers; handlers parse nothing
themselves and call one library function."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

import slmkit
from slmkit.cli import (agent, checkpoint, convert, data, export, finetune, generate, lora, model, models, quantize,
                        quickstart, rag, sandbox, serve, tokenizer, train)
from slmkit.errors import SlmkitError

COMMANDS = (tokenizer, data, model, train, finetune, checkpoint, lora, quickstart, generate, models, convert, quantize,
            export, serve, rag, agent, sandbox)  # in the order `slmkit --help` lists them


def build_parser() -> argparse.ArgumentParser:
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

    for module in COMMANDS:
        module.register(commands, common)
    return parser


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, like errors: no source file, line number or code line."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = print_warning
            args.handler(args)
    except SlmkitError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given cannot be read or written and no check above named it
        if getattr(args, "debug", False):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{(e.strerror or str(e)).lower()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
