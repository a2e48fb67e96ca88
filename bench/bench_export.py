"""Export benchmark: one model on every runtime it ships to, same run, same machine.

For PyTorch fp32 (the reference), ONNX Runtime fp32 / dynamic int8 / 4-bit MatMulNBits and
llama.cpp f16 / q8_0 / q4_0 (through llama-cpp-python), on the same token ids:

  size        bytes on disk of the weights file (model.safetensors, model.onnx, the .gguf)
  perplexity  sliding windows (context = the model's, stride = half) over held-out tokens
  tokens/s    greedy decode at batch 1: a 32-token prompt, then 128 new tokens through the KV
              cache (median of --repeats runs after a warm-up); also the ratio to PyTorch, and how
              many leading greedy tokens equal PyTorch's

Each runtime uses the machine's cores (torch.get_num_threads(); ORT and llama.cpp the same count).

    .venv/bin/python bench/bench_export.py runs/quickstart/run/final \\
        --tokens runs/quickstart/data/val_000000.npy
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import slmkit
from slmkit.errors import MissingExtraError
from slmkit.eval.llama_cpp import greedy_ids, open_gguf, perplexity_of_ids
from slmkit.eval.perplexity import score_windows, windows
from slmkit.export.gguf import export_gguf
from slmkit.export.onnx import MODEL_DIR_FILES, export_onnx, quantize_onnx
from slmkit.generation import generate_ids
from slmkit.generation.ort import OrtModel

PROMPT_TOKENS, NEW_TOKENS = 32, 128


def median_tokens_per_s(run: Callable[[], list[int]], repeats: int) -> tuple[float, list[int]]:
    out = run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    assert len(out) == NEW_TOKENS, len(out)
    return NEW_TOKENS / statistics.median(times), out


def slmkit_perplexity(model, ids: list[int], context: int) -> float:
    total, count, batch = 0.0, 0, []
    for w in windows(ids, context, context // 2):
        batch.append(w)
        count += w.scored
        if len(batch) == 8:
            total, batch = total + score_windows(model, batch), []
    if batch:
        total += score_windows(model, batch)
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory")
    parser.add_argument("--tokens", required=True, help="held-out token ids (.npy shard of the same tokenizer)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens to score (default: 16384)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", help="where to write the exports (default: a temporary directory)")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    model, _ = slmkit.load(args.model)
    context = model.cfg.context_length
    held_out = [int(t) for t in np.load(args.tokens, mmap_mode="r")[: args.eval_tokens]]
    prompt = held_out[:PROMPT_TOKENS]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    rows: list[tuple[str, int, float, float, list[int]]] = []

    def torch_run(m) -> Callable[[], list[int]]:
        return lambda: generate_ids(m, [prompt], NEW_TOKENS)[0]

    speed, reference_ids = median_tokens_per_s(torch_run(model), args.repeats)
    rows.append(("PyTorch fp32", (Path(args.model) / "model.safetensors").stat().st_size,
                 slmkit_perplexity(model, held_out, context), speed, reference_ids))

    start = time.perf_counter()
    fp32_dir = export_onnx(args.model, work / "onnx-fp32", force=True)
    print(f"ONNX export + validation: {time.perf_counter() - start:.0f} s")
    for method in (None, "int8", "int4"):
        directory = fp32_dir
        if method:
            directory = work / f"onnx-{method}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            for name in MODEL_DIR_FILES:
                shutil.copy2(fp32_dir / name, directory / name)
            quantize_onnx(fp32_dir / "model.onnx", directory / "model.onnx", method)
        ort_model = OrtModel(directory, threads=threads)
        speed, ids = median_tokens_per_s(torch_run(ort_model), args.repeats)
        rows.append((f"ONNX Runtime {method or 'fp32'}", (directory / "model.onnx").stat().st_size,
                     slmkit_perplexity(ort_model, held_out, context), speed, ids))

    for kind in ("f16", "q8_0", "q4_0"):
        path = export_gguf(args.model, work / f"model-{kind}.gguf", type=kind, force=True)
        try:
            scorer = open_gguf(path, n_ctx=context, logits_all=True, n_threads=threads)
        except MissingExtraError as e:  # llama-cpp-python missing: report the size only
            rows.append((f"llama.cpp {kind}", path.stat().st_size, float("nan"), float("nan"), []))
            print(f"llama.cpp {kind}: {e}")
            continue
        ppl = perplexity_of_ids(scorer, [held_out], context)
        scorer.close()
        llm = open_gguf(path, n_ctx=context, n_threads=threads)
        speed, ids = median_tokens_per_s(lambda llm=llm: greedy_ids(llm, prompt, NEW_TOKENS), args.repeats)
        llm.close()
        rows.append((f"llama.cpp {kind}", path.stat().st_size, ppl, speed, ids))

    base_ppl, base_speed = rows[0][2], rows[0][3]
    print(f"\nmodel {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, context {context}; "
          f"{len(held_out)} held-out tokens; {threads} threads\n")
    print("| runtime | size | perplexity | delta % | tokens/s (batch 1) | vs PyTorch | greedy tokens = PyTorch |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, size, ppl, speed, ids in rows:
        same = next((i for i, (a, b) in enumerate(zip(ids, reference_ids)) if a != b), min(len(ids), NEW_TOKENS))
        print(f"| {name} | {size / 2**20:.2f} MiB | {ppl:.4f} | {100 * (ppl / base_ppl - 1):+.2f} | {speed:.0f} | "
              f"{speed / base_speed:.2f}x | {same}/{NEW_TOKENS} |")


if __name__ == "__main__":
    main()
