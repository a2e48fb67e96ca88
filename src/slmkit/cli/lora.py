"""`slmkit lora merge`, `slmkit lora export-peft` and `slmkit lora import`."""

from __future__ import annotations

import argparse


def cmd_merge(args: argparse.Namespace) -> None:
    from slmkit.model.lora import merge_adapter_dir

    out = merge_adapter_dir(args.model, args.out, args.adapter, force=args.force)
    print(f"merged adapter {args.adapter!r} into {out}")


def cmd_export_peft(args: argparse.Namespace) -> None:
    from slmkit.convert.peft import export_peft

    out = export_peft(args.model, args.out, args.adapter, family=args.family, base_model=args.base_model, force=args.force)
    print(f"wrote {out}")


def cmd_import(args: argparse.Namespace) -> None:
    from slmkit.model.lora import import_adapter

    out = import_adapter(args.model, args.adapter_dir, args.name, force=args.force)
    print(f"wrote {out}")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.convert.families import FAMILIES

    lora = commands.add_parser("lora", help="LoRA adapters: merge, PEFT export and import",
                               description="Work with the LoRA adapters of a model directory (MODEL_DIR/adapters/NAME).")
    sub = lora.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("merge", parents=[common], help="merge an adapter into the base weights",
                       description="Write a plain model directory with MODEL_DIR/adapters/NAME merged into its weights.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory with adapters/")
    p.add_argument("--adapter", default="default", help="adapter name (default: default)")
    p.add_argument("--out", required=True, metavar="DIR", help="merged model directory")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("export-peft", parents=[common], help="an adapter alone, in PEFT's layout",
                       description="Write one adapter as adapter_config.json + adapter_model.safetensors under the Hugging "
                                   "Face module names of the model's `convert to-hf` export, for "
                                   "peft.PeftModel.from_pretrained (`convert to-hf` writes every adapter beside the export).")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory with adapters/")
    p.add_argument("--adapter", default="default", help="adapter name, or an adapter directory (default: default)")
    p.add_argument("--out", required=True, metavar="DIR", help="PEFT adapter directory to write")
    p.add_argument("--base-model", metavar="ID_OR_DIR",
                   help="base_model_name_or_path to record: the Hub id or directory of the HF base model (default: none)")
    p.add_argument("--family", choices=list(FAMILIES), help="HF family, as for `convert to-hf` (default: the first that fits)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_export_peft)

    p = sub.add_parser("import", parents=[common], help="add an adapter (slmkit's or PEFT's) to a model directory",
                       description="Check a LoRA adapter directory (slmkit's layout, or one PEFT wrote for the model's Hugging "
                                   "Face form) against the model and write it to MODEL_DIR/adapters/NAME in slmkit's layout.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory the adapter is for")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("--name", help="adapter name under MODEL_DIR/adapters/ (default: ADAPTER_DIR's name)")
    p.add_argument("--force", action="store_true", help="replace an adapter of that name")
    p.set_defaults(handler=cmd_import)
