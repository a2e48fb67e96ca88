"""`slmkit export onnx` and `slmkit export gguf`."""

from __future__ import annotations

import argparse


def cmd_export_onnx(args: argparse.Namespace) -> None:
    import json

    from slmkit.export.onnx import EXPORT_INFO, export_onnx

    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    out = export_onnx(args.model, args.out, opset=args.opset, quantize=args.quantize, force=args.force, graph=args.graph,
                      **tolerance)
    info = json.loads((out / EXPORT_INFO).read_text(encoding="utf-8"))
    print(f"wrote {out} ({info['graph']} graph; max |logit - PyTorch| {info['max_abs_difference_fp32']:.1e} fp32"
          + (f", {info['max_abs_difference_quantized']:.1e} {args.quantize}" if args.quantize else "") + ")")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from slmkit.export.gguf import export_gguf

    out = export_gguf(args.model, args.out, type=args.type, modelfile=args.modelfile, force=args.force)
    print(f"wrote {out}" + (f" and {out.with_name('Modelfile')}" if args.modelfile else ""))


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = commands.add_parser("export", help="export a model to ONNX or GGUF",
                                 description="Export a model directory for another runtime: ONNX Runtime or llama.cpp / Ollama.")
    formats = export.add_subparsers(dest="subcommand", metavar="FORMAT", required=True)

    p = formats.add_parser("onnx", parents=[common], help="an ONNX decoder with KV cache, for ONNX Runtime",
                           description="Export the decoder with past key/values as inputs and outputs (dynamic batch "
                                       "and sequence) into a self-contained directory (model.onnx, config, tokenizer). "
                                       "Llama-style models (rmsnorm, swiglu, rope, no biases) get a graph built on ONNX "
                                       "Runtime's fused kernels (GroupQueryAttention, in-place KV cache), the fast one "
                                       "for decoding; other models are traced with torch.onnx.export. "
                                       "The export is checked against PyTorch (max |logit difference| <= --tolerance x max(1, max |logit|)) and "
                                       "fails otherwise. Run it with `slmkit generate OUT PROMPT --backend onnx`.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset version (default: 21 for the fused graph, the exporter's for the traced one)")
    p.add_argument("--graph", choices=["auto", "fused", "traced"], default="auto",
                   help="fused: ONNX Runtime's fused decoder kernels (llama-style models); traced: torch.onnx.export "
                        "(any decoder, HF/optimum-style inputs); auto: fused when the model allows it (default)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="ONNX Runtime weight quantization: dynamic int8 MatMuls, or 4-bit blockwise MatMulNBits")
    p.add_argument("--tolerance", type=float, metavar="T",
                   help="largest accepted |logit difference| from PyTorch, as a fraction of max(1, max |logit|) (default: 1e-4)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(handler=cmd_export_onnx)

    p = formats.add_parser("gguf", parents=[common], help="a GGUF file for llama.cpp and Ollama",
                           description="Write a llama-style (rope, rmsnorm, swiglu) or gpt2-style (learned positions, "
                                       "layernorm, gelu) model and its tokenizer as one GGUF file.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write")
    p.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"], default="f16",
                   help="weight type; norms stay f32, q4_0 keeps embeddings/output at q8_0 (default: f16)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside the file")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=cmd_export_gguf)
