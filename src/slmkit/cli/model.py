"""`slmkit inspect`."""

from __future__ import annotations

import argparse
import json


def cmd_inspect(args: argparse.Namespace) -> None:
    from slmkit.config import parse_overrides
    from slmkit.model.inspect import (
        format_report,
        inspect_config,
        logged_utilization,
        resolve_config,
    )

    cfg = resolve_config(args.model, parse_overrides(args.set))
    info = inspect_config(cfg, batch_size=args.batch_size, seq_len=args.seq_len)
    utilization = logged_utilization(args.model) if cfg.ffn_kind == "moe" else None
    if utilization:
        info["expert_utilization"] = utilization
    print(json.dumps(info, indent=2) if args.json else format_report(info))


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("inspect", parents=[common], help="parameters, FLOPs and memory of a model config",
                            description="Count parameters and estimate FLOPs per token, KV-cache size and training / "
                                        "inference memory of a preset or model directory, from its config alone.")
    p.add_argument("model", metavar="PRESET_OR_MODEL_DIR", help="a preset name (e.g. tiny, gpt2-small) or a model directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the memory estimates (default: 1)")
    p.add_argument("--seq-len", type=int, help="sequence length of the estimates (default: the context length)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_inspect)
