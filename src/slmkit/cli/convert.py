"""`slmkit convert from-hf`, `slmkit convert from-gguf` and `slmkit convert to-hf`."""

from __future__ import annotations

import argparse


def cmd_from_hf(args: argparse.Namespace) -> None:
    from slmkit.convert import from_hf

    out = from_hf(args.src, args.out, args.dtype, strict=not args.allow_unknown_config, force=args.force)
    print(f"wrote {out}")


def cmd_from_gguf(args: argparse.Namespace) -> None:
    from slmkit.convert import from_gguf

    out = from_gguf(args.src, args.out, args.dtype, keep_quant=args.keep_quant, force=args.force)
    print(f"wrote {out}")


def cmd_to_hf(args: argparse.Namespace) -> None:
    from slmkit.convert import to_hf

    out = to_hf(args.model, args.out, args.family, force=args.force, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.convert.families import FAMILIES

    families = ", ".join(FAMILIES)
    p = commands.add_parser("convert", help="import Hugging Face checkpoints and GGUF files; export Hugging Face checkpoints",
                            description=f"Move models between slmkit and the Hugging Face format (transformers, vLLM). Families: {families}.")
    sub = p.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    f = sub.add_parser("from-hf", parents=[common], help="HF checkpoint (directory or Hub id) -> slmkit model directory",
                       description="Import an HF causal LM: config.json + *.safetensors (sharded or not; pytorch_model.bin only "
                                   "through the weights-only loader) and its tokenizer. SRC is a local directory or a Hub id, "
                                   "downloaded when online.")
    f.add_argument("src", metavar="SRC", help="HF model directory, or a Hub id such as Qwen/Qwen2.5-0.5B")
    f.add_argument("--out", required=True, metavar="MODEL_DIR", help="slmkit model directory to write")
    f.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the stored weights (default: float32)")
    f.add_argument("--allow-unknown-config", action="store_true",
                   help="import even when config.json has keys the mapping does not understand (warns instead of failing)")
    f.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    f.set_defaults(handler=cmd_from_hf)

    g = sub.add_parser("from-gguf", parents=[common], help="GGUF file (llama.cpp, Ollama) -> slmkit model directory",
                       description="Import a GGUF file: its weights dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
                                   "Q5_1, K-quants), its tokenizer as tokenizer.json and its chat template. Architectures: "
                                   "llama, qwen2, qwen3, gemma3, phi3, gpt2.")
    g.add_argument("src", metavar="FILE_OR_NAME", help="a .gguf file, or an installed model's name (see `slmkit models`)")
    g.add_argument("--out", required=True, metavar="MODEL_DIR", help="slmkit model directory to write")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the stored weights (default: float32)")
    g.add_argument("--keep-quant", action="store_true",
                   help="keep Q8_0 matrices quantized (int8 blocks of 32 + fp16 scales, ~4x smaller than float32) and "
                        "compute them as llama.cpp does, rounding activations to Q8_0 blocks; other types are dequantized")
    g.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    g.set_defaults(handler=cmd_from_gguf)

    t = sub.add_parser("to-hf", parents=[common], help="slmkit model directory -> HF checkpoint",
                       description="Export a model directory as config.json + model.safetensors + tokenizer files + "
                                   "generation_config.json, loadable by transformers.AutoModelForCausalLM without custom code.")
    t.add_argument("model", metavar="MODEL_DIR", help="slmkit model directory")
    t.add_argument("--out", required=True, metavar="HF_DIR", help="directory to write")
    t.add_argument("--family", choices=list(FAMILIES), help="HF family to write (default: the first that expresses the config exactly)")
    t.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split larger weights into shards with an index, as transformers does (default: 5GB)")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.set_defaults(handler=cmd_to_hf)
