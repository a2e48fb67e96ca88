"""Pieces shared by the subcommands."""

from __future__ import annotations

import argparse
import os
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
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror.lower()}") from None
    return [line.strip("\r\n") for line in lines if line.strip()]


def device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of every command that runs a model (resolved by slmkit.devices)."""
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="where the model runs: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the model's weights and compute; auto: float32 on CPU, bfloat16 on GPUs that "
                        "support it (default: auto)")


def reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .csv/.tsv files to read (default: text)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="undecodable UTF-8: stop with an error naming the file (strict) or substitute U+FFFD (replace)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip files and folders that cannot be read (default: stop with an error naming the first)")


def report_unreadable(paths: list[Path]) -> None:
    if paths:
        print(f"skipped {len(paths)} unreadable {'path' if len(paths) == 1 else 'paths'} (first: {paths[0]})")


def check_writable(out: str) -> None:
    """Fail before long work when `out` could not be created: its first existing ancestor must be writable."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: permission denied ({parent}); choose a writable --out")


