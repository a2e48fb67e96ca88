"""Export benchmark: one model on every runtime it ships to, same run, same machine.

For PyTorch fp32 (the reference), ONNX Runtime fp32 / dynamic int8 / 4-bit MatMulNBits on the
graph `slmkit export onnx` writes by default (the fused one for llama-style models), ONNX Runtime
fp32 on the traced graph (torch.onnx.export) for comparison, and llama.cpp f16 / q8_0 / q4_0
(through llama-cpp-python), on the same token ids:

  size        bytes on disk of the weights file (model.safetensors, model.onnx, the .gguf)
  perplexity  sliding windows (context = the model's, stride = half) over held-out tokens
  tokens/s    greedy decode at batch 1: a 32-token prompt, then 128 new tokens through the KV
              cache; after a warm-up of each, the runtimes take turns for --repeats rounds (so a
              change in machine load hits all of them alike) and the median per runtime is
              reported; also the ratio to PyTorch, and how many leading greedy tokens equal PyTorch's

Each runtime uses the machine's cores (torch.get_num_threads(); ORT and llama.cpp the same count).

    .venv/bin/python bench/bench_export.py runs/quickstart/run/final \\
        --tokens runs/quickstart/data/val_000000.npy
"""

from __future__ import annotations

import argparse
import json
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


def median_tokens_per_s(runs: dict[str, Callable[[], list[int]]], repeats: int) -> dict[str, tuple[float, list[int]]]:
    """name -> (median tokens/s, greedy ids). Every run is warmed up once, then they take turns."""
    out = {name: run() for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out[name] = run()
            times[name].append(time.perf_counter() - start)
    assert all(len(ids) == NEW_TOKENS for ids in out.values()), {name: len(ids) for name, ids in out.items()}
    return {name: (NEW_TOKENS / statistics.median(times[name]), out[name]) for name in runs}


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
    sizes: dict[str, int] = {"PyTorch fp32": (Path(args.model) / "model.safetensors").stat().st_size}
    perplexities = {"PyTorch fp32": slmkit_perplexity(model, held_out, context)}
    runs: dict[str, Callable[[], list[int]]] = {"PyTorch fp32": lambda: generate_ids(model, [prompt], NEW_TOKENS)[0]}

    exports = {}
    for graph in ("auto", "traced"):
        start = time.perf_counter()
        exports[graph] = export_onnx(args.model, work / f"onnx-{graph}", force=True, graph=graph)
        info = json.loads((exports[graph] / "export.json").read_text(encoding="utf-8"))
        print(f"ONNX export ({info['graph']} graph) + validation: {time.perf_counter() - start:.1f} s, "
              f"max |logit difference| {info['max_abs_difference_fp32']:.1e}")
    default_graph = json.loads((exports["auto"] / "export.json").read_text(encoding="utf-8"))["graph"]
    for method in (None, "int8", "int4", "traced"):
        directory = exports["traced" if method == "traced" else "auto"]
        if method in ("int8", "int4"):
            directory = work / f"onnx-{method}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            for name in MODEL_DIR_FILES:
                shutil.copy2(exports["auto"] / name, directory / name)
            quantize_onnx(exports["auto"] / "model.onnx", directory / "model.onnx", method)
        name = "ONNX Runtime fp32, traced graph" if method == "traced" else f"ONNX Runtime {method or 'fp32'}, {default_graph} graph"
        ort_model = OrtModel(directory, threads=threads)
        sizes[name] = (directory / "model.onnx").stat().st_size
        perplexities[name] = slmkit_perplexity(ort_model, held_out, context)
        runs[name] = lambda m=ort_model: generate_ids(m, [prompt], NEW_TOKENS)[0]

    llms = []
    for kind in ("f16", "q8_0", "q4_0"):
        name = f"llama.cpp {kind}"
        path = export_gguf(args.model, work / f"model-{kind}.gguf", type=kind, force=True)
        sizes[name] = path.stat().st_size
        try:
            scorer = open_gguf(path, n_ctx=context, logits_all=True, n_threads=threads)
        except MissingExtraError as e:  # llama-cpp-python missing: report the size only
            print(f"{name}: {e}")
            continue
        perplexities[name] = perplexity_of_ids(scorer, [held_out], context)
        scorer.close()
        llms.append(open_gguf(path, n_ctx=context, n_threads=threads))
        runs[name] = lambda llm=llms[-1]: greedy_ids(llm, prompt, NEW_TOKENS)
    speeds = median_tokens_per_s(runs, args.repeats)
    for llm in llms:
        llm.close()
    reference_ids = speeds["PyTorch fp32"][1]
    rows = [(name, size, perplexities.get(name, float("nan")), *speeds.get(name, (float("nan"), []))) for name, size in sizes.items()]

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
