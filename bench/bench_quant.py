"""Quantization benchmark: every method against the fp32 model, same run, same machine.

For each method the model is loaded afresh, quantized in memory, saved (for its size on disk) and
measured: held-out perplexity, and batch-1 greedy decode tokens/s with the fp32 model timed right
before it (the ratio is what to read on a shared machine). `--kernels` also times the int8 matmul
kernels PyTorch offers on CPU against dequantize-then-matmul on this model's layer shapes.

Held-out text and calibration come from a token-shard directory (`slmkit data` output: the val
shard is decoded into documents, calibration windows are cut from the train shard), or from text
files with --eval / --calib.

    .venv/bin/python bench/bench_quant.py runs/quickstart/run/final --data runs/quickstart/data --kernels
    .venv/bin/python bench/bench_quant.py runs/quickstart/run/final --only kernels
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slmkit.eval.perplexity import perplexity_of_texts
from slmkit.model.io import load, save_model_dir
from slmkit.quant import quantize_model
from slmkit.quant.calibration import calibration_windows
from slmkit.quant.quantize_dir import decode_tokens_per_s, held_out_texts, weights_bytes
from slmkit.quant.targets import BLOCKS, linear_targets

METHODS = [  # name, method, options
    ("int8 RTN (per channel)", "int8", {}),
    ("int4 RTN g{g}", "int4", {"group_size": "G"}),
    ("GPTQ int4 g{g}", "gptq", {"group_size": "G"}),
    ("GPTQ int4 g{g} act-order", "gptq", {"group_size": "G", "act_order": True}),
    ("SmoothQuant W8A8", "smoothquant", {}),
    ("fp8 e4m3 (per tensor)", "fp8", {}),
]


def shard_documents(path: Path, tokenizer, max_tokens: int) -> list[str]:
    ids = np.load(path, mmap_mode="r")[:max_tokens].tolist()
    docs, current = [], []
    for token in ids:
        if token == tokenizer.eot_id:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return [tokenizer.decode(d) for d in docs + [current] if d]


def shard_windows(path: Path, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    ids = np.load(path, mmap_mode="r")
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.stack([torch.from_numpy(np.array(ids[s : s + seq_len], dtype=np.int64)) for s in starts])


def timed(fn, repeats: int = 5, seconds: float = 0.2) -> float:
    """Median microseconds per call; each of `repeats` rounds runs about `seconds`."""
    fn()
    start = time.perf_counter()
    fn()
    number = max(1, int(seconds / max(time.perf_counter() - start, 1e-7)))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs) * 1e6


def kernel_row(n: int, k: int, m: int) -> dict:
    """Microseconds per x [m, k] @ W^T [k, n]: fp32; int8 weight-only by dequantize-then-matmul and by
    _weight_int8pack_mm; W8A8 (per-token int8 activations) emulated in float and by _int_mm."""
    w, x = torch.randn(n, k), torch.randn(m, k)
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)

    def w8a8(int_mm: bool) -> torch.Tensor:
        xs = x.abs().amax(1, keepdim=True) / 127
        xq = torch.round(x / xs)
        y = torch._int_mm(xq.to(torch.int8), q.t()).float() if int_mm else F.linear(xq, q.float())
        return y * xs * scale

    return {"shape": f"{m}x{k} @ {k}x{n}", "fp32": timed(lambda: F.linear(x, w)),
            "int8 dequantize+matmul": timed(lambda: F.linear(x, q.float()) * scale),
            "_weight_int8pack_mm": timed(lambda: torch._weight_int8pack_mm(x, q, scale)),
            "W8A8 emulated": timed(lambda: w8a8(False)), "W8A8 _int_mm": timed(lambda: w8a8(True))}


def method_rows(args: argparse.Namespace) -> list[dict]:
    """One row per method: size on disk, held-out perplexity, decode tokens/s against fp32."""
    base, tokenizer = load(args.model)
    dims = sorted({m.in_features for m in linear_targets(base, include=BLOCKS).values()})
    group = next(g for g in (args.group_size, 128, 64, 32, 16) if g and all(d % g == 0 for d in dims))
    seq_len = min(512, base.cfg.context_length)
    if args.eval:
        texts = held_out_texts(tokenizer, args.eval, args.eval_tokens)
    else:
        texts = shard_documents(args.data / "val_000000.npy", tokenizer, args.eval_tokens)
    if args.calib:
        calib = calibration_windows(tokenizer, args.calib, args.calib_samples, seq_len)
    else:
        calib = shard_windows(args.data / "train_000000.npy", args.calib_samples, seq_len, seed=0)
    prompt = tokenizer.encode_ordinary(texts[0])[:16]
    print(f"model {args.model}: held-out {sum(len(tokenizer.encode_ordinary(t)) for t in texts)} tokens, "
          f"calibration {len(calib)} x {calib.shape[1]} tokens, int4 group size {group}, {args.threads} threads", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(base, Path(tmp) / "fp32")
        fp32_ppl = perplexity_of_texts(base, tokenizer, texts).perplexity
        rows.append({"method": "fp32 PyTorch", "size_mb": weights_bytes(Path(tmp) / "fp32") / 1e6, "perplexity": fp32_ppl,
                     "delta_pct": 0.0, "tokens_per_s": decode_tokens_per_s(base, prompt), "speed_vs_fp32": 1.0,
                     "seconds": 0.0})
        for label, method, options in METHODS:
            options = {k: group if v == "G" else v for k, v in options.items()}
            model, _ = load(args.model)
            start = time.perf_counter()
            section = quantize_model(model, method, calib_ids=calib, **options)
            seconds = time.perf_counter() - start
            save_model_dir(model, Path(tmp) / method, quantization=section)
            ppl = perplexity_of_texts(model, tokenizer, texts).perplexity
            fp32_tps = decode_tokens_per_s(base, prompt)  # timed next to it: the ratio survives a busy machine
            tps = decode_tokens_per_s(model, prompt)
            rows.append({"method": label.format(g=group), "size_mb": weights_bytes(Path(tmp) / method) / 1e6,
                         "perplexity": ppl, "delta_pct": 100 * (ppl / fp32_ppl - 1), "tokens_per_s": tps,
                         "speed_vs_fp32": tps / fp32_tps, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| method | size (MB) | perplexity | delta % | decode tok/s | vs fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['size_mb']:.2f} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['speed_vs_fp32']:.2f}x | {r['seconds']:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model directory (fp32)")
    parser.add_argument("--data", type=Path, help="token-shard directory with train_000000.npy and val_000000.npy")
    parser.add_argument("--eval", nargs="+", help="held-out text files (instead of the val shard)")
    parser.add_argument("--calib", nargs="+", help="calibration text files (instead of the train shard)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored (default: 16384)")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default: 128)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="int4 group size (default: 128; else the largest of 128, 64, 32, 16 that divides every layer)")
    parser.add_argument("--kernels", action="store_true", help="also time the int8 matmul kernels")
    parser.add_argument("--only", choices=["methods", "kernels"], help="run one half only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.only != "kernels" and not (args.data or (args.eval and args.calib)):
        parser.error("give --data DIR, or both --eval and --calib")
    torch.set_num_threads(args.threads)

    rows = method_rows(args) if args.only != "kernels" else []
    kernels = []
    if args.kernels or args.only == "kernels":
        cfg = load(args.model)[0].cfg
        shapes = ((cfg.ffn_hidden, cfg.d_model), (cfg.d_model, cfg.ffn_hidden), (2048, 2048))
        kernels = [kernel_row(n, k, m) for n, k in shapes for m in (1, 256)]
        print("\nmicroseconds per matmul (median)\n")
        print("| x @ W^T | " + " | ".join(list(kernels[0])[1:]) + " |")
        print("|---" * len(kernels[0]) + "|")
        for r in kernels:
            print(f"| {r['shape']} | " + " | ".join(f"{v:.0f}" for k, v in r.items() if k != "shape") + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": rows, "kernels": kernels}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
