"""`slmkit checkpoint consolidate`: a sharded (FSDP) checkpoint -> a model directory."""

from __future__ import annotations

import argparse


def cmd_consolidate(args: argparse.Namespace) -> None:
    from slmkit.train.sharded import consolidate

    out = consolidate(args.checkpoint, args.out, force=args.force)
    print(f"wrote {out}")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    checkpoint = commands.add_parser("checkpoint", help="work with training checkpoints",
                                     description="Work with the checkpoints of a training run (RUN/checkpoints/step-N).")
    cmds = checkpoint.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = cmds.add_parser("consolidate", parents=[common], help="a sharded checkpoint -> a model directory",
                        description="Gather the shards of a checkpoint saved with --strategy fsdp (on any number of "
                                    "processes) into a normal model directory, as the run's final/ would be at that step.")
    p.add_argument("checkpoint", metavar="RUN/checkpoints/step-N", help="a complete sharded checkpoint")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_consolidate)
