"""Pieces shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from slmkit.errors import InputError


def read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"domain-tokens file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    return [line.strip("\r\n") for line in lines if line.strip()]



def reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .csv/.tsv files to read (default: text)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="undecodable UTF-8: stop with an error naming the file (strict) or substitute U+FFFD (replace)")


