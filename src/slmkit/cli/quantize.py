"""`slmkit quantize`."""

from __future__ import annotations

import argparse

from slmkit.cli.common import device_options


def cmd_quantize(args: argparse.Namespace) -> None:
    from slmkit.quant import quantize

    report = quantize(args.model, args.method, args.out, group_size=args.group_size, symmetric=not args.asymmetric,
                      calib=args.calib, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                      eval_paths=args.eval, eval_tokens=args.eval_tokens,
                      eval_context=args.eval_context, alpha=args.alpha, act_order=args.act_order,
                      damp=args.damp, max_ppl_increase=args.max_ppl_increase, seed=args.seed, force=args.force,
                      device=args.device, dtype=args.dtype, progress=not args.quiet)
    print(report.markdown(), end="")
    print(f"wrote {args.out}")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.quant import METHODS

    p = commands.add_parser(
        "quantize", parents=[common], help="quantize a model to int8, int4, GPTQ int4, SmoothQuant W8A8 or fp8",
        description="Quantize the Linear layers of a model's blocks (embeddings and lm_head stay full precision) and "
                    "write a model directory that `slmkit generate` and slmkit.load read, with quant_report.md/.json: "
                    "size on disk, held-out perplexity and decode tokens/s before and after.",
        epilog="methods: int8 / int4 round-to-nearest (no calibration); gptq: int4 with Hessian-based error "
               "compensation (needs --calib); smoothquant: int8 weights and activations (needs --calib); "
               "fp8: e4m3 weights, dequantized on the fly.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--method", required=True, choices=METHODS, help="quantization method")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="input columns per scale; 0: one per output channel (fp8: per tensor). Default for "
                        "int4/gptq: per layer, the largest of 128, 64, 32, 16 that divides its input width; per "
                        "channel for int8, per tensor for fp8")
    p.add_argument("--asymmetric", action="store_true", help="int8/int4/gptq: zero points per group (default: symmetric)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help="calibration text files or directories (gptq, smoothquant)")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N", help="calibration windows (default: 128)")
    p.add_argument("--calib-seq-len", type=int, metavar="N", help="tokens per calibration window (default: the context, at most 512)")
    p.add_argument("--eval", nargs="+", metavar="FILE", help="held-out text for the perplexity in the report (default: the --calib files)")
    p.add_argument("--eval-tokens", type=int, default=16384, metavar="N", help="score at most N held-out tokens (default: 16384)")
    p.add_argument("--eval-context", type=int, default=512, metavar="N",
                   help="tokens per perplexity window, at most the model's context (default: 512)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant migration strength in [0, 1] (default: 0.5)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation magnitude")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: dampening, as a fraction of the mean Hessian diagonal (default: 0.01)")
    p.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="refuse (exit 2, nothing written) when perplexity rises by more than PCT percent")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampling (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    device_options(p)
    p.set_defaults(handler=cmd_quantize)
