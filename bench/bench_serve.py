"""Serving benchmark: slmkit's server under load, against the same requests one at a time and
against a one-at-a-time loop over Hugging Face transformers `generate`, same run, same machine.

  load        C concurrent streaming clients send N completions (random token-id prompts of P
              tokens, exactly M output tokens each, greedy, ignore_eos) through `slmkit bench
              serve`'s client. Checked: no failed request, every output equal to the same request
              decoded alone, process memory flat after warm-up.
  one-by-one  the same requests through the same server at concurrency 1: the throughput ratio,
              and the single-request outputs the load run is compared with.
  HF          `LlamaForCausalLM.generate(do_sample=False)` on the same weights, one request at a
              time, on the first --hf-requests requests (outputs must match ours too).
  prefix      requests sharing a 192-token prefix (a system prompt) with prefix caching on and off.
  speculative code prompts at concurrency 1, with and without an early-exit draft (the model's own
              first layer): TPOT, throughput, acceptance rate, outputs identical.
  The on/off comparisons alternate (off, on, off, on, ...) for --rounds rounds; medians reported.

    .venv/bin/python bench/bench_serve.py                       # defaults: C=32, N=200, P=32, M=32
    .venv/bin/python bench/bench_serve.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import hf_model

from slmkit.model.io import load
from slmkit.serve.bench import bench_serve

MODEL = "runs/quickstart/run/final"  # made by `make quickstart`


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server_process(model_dir: str, *flags: str) -> Iterator[tuple[str, int]]:
    """`slmkit serve` in its own process (as in production: the load generator does not share its
    interpreter); yields (url, pid) once healthy, stops it with SIGTERM (which must exit 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", model_dir, "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        if proc.wait(60) != 0:
            raise SystemExit(f"the server exited with {proc.returncode} on SIGTERM")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def hf_generate(model_dir: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
    """One request at a time through transformers; (output ids, seconds of each request)."""
    ours, _ = load(model_dir)
    hf = hf_model(ours.cfg)
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    hf.eval()
    hf.generation_config.eos_token_id = None  # exactly max_tokens, like ignore_eos
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4, "HF twin disagrees with slmkit"
        hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        outputs, seconds = [], []
        for p in prompts:
            start = time.perf_counter()
            out = hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            seconds.append(time.perf_counter() - start)
            outputs.append(out[0, len(p):].tolist())
    return outputs, seconds


def code_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """Windows of Python standard-library source, the quickstart model's own domain."""
    text = "\n".join(inspect.getsource(m) for m in (json, argparse, random))
    ids = tokenizer.encode_ordinary(text)
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - length) for _ in range(n)]
    return [ids[s : s + length] for s in starts]


def summary(r) -> dict:
    return {"completed": r.completed, "failed": r.failed, "duration_s": round(r.duration_s, 2),
            "req_per_s": round(r.request_throughput, 3), "output_tok_per_s": round(r.output_throughput, 1),
            "ttft_ms": {k: round(v, 1) for k, v in r.ttft_ms.items()}, "tpot_ms": {k: round(v, 1) for k, v in r.tpot_ms.items()},
            "itl_ms": {k: round(v, 1) for k, v in r.itl_ms.items()}, "e2el_ms": {k: round(v, 1) for k, v in r.e2el_ms.items()}}


def median_summary(results: list) -> dict:
    """Medians over rounds of the headline numbers."""
    med = statistics.median
    return {"failed": sum(r.failed for r in results), "output_tok_per_s": round(med(r.output_throughput for r in results), 1),
            "ttft_p50_ms": round(med(r.ttft_ms["p50"] for r in results), 1),
            "ttft_mean_ms": round(med(r.ttft_ms["mean"] for r in results), 1),
            "tpot_p50_ms": round(med(r.tpot_ms["p50"] for r in results), 1),
            "e2el_p50_ms": round(med(r.e2el_ms["p50"] for r in results), 1),
            "per_round_output_tok_per_s": [round(r.output_throughput, 1) for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hf-requests", type=int, default=40, help="requests of the HF generate loop (default: 40)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the on/off comparisons (default: 3)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_serve.json")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.hf_requests, args.rounds = 16, 8, 8, 4, 1
    torch.set_num_threads(os.cpu_count() or 1)
    _, tokenizer = load(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(tokenizer.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "load_avg_start": os.getloadavg()[0]}, "settings": vars(args)}

    n_hf = args.hf_requests
    print(f"HF generate, one at a time, {n_hf} requests ...", flush=True)
    hf_outputs, seconds = hf_generate(args.model, prompts[:n_hf], args.max_tokens)
    report["hf_one_at_a_time"] = {"requests": n_hf, "duration_s": round(sum(seconds), 2),
                                  "output_tok_per_s": round(n_hf * args.max_tokens / sum(seconds), 1)}

    with server_process(args.model, "--max-seqs", str(max(args.concurrency, 32)), "--max-batch-tokens", "512") as (url, pid):
        print("warm-up ...", flush=True)
        bench_serve(url, args.concurrency, prompts=prompts[: args.concurrency], max_tokens=args.max_tokens)
        rss_warm = rss_mb(pid)
        print(f"load: concurrency {args.concurrency}, {args.requests} requests ...", flush=True)
        load_run = bench_serve(url, args.concurrency, prompts=prompts, max_tokens=args.max_tokens)
        rss_end = rss_mb(pid)
        blocks_free, blocks_used = gauge(url, "slmkit_kv_blocks_free"), gauge(url, "slmkit_kv_blocks_used")
        print(f"one at a time, {args.requests} requests ...", flush=True)
        single = bench_serve(url, 1, prompts=prompts, max_tokens=args.max_tokens)
        texts, expected = [r.text for r in load_run.results], [r.text for r in single.results]
        report["load"] = {**summary(load_run), "http_errors": [r.error for r in load_run.results if not r.ok][:5],
                          "outputs_equal_single_request_greedy": texts == expected,
                          "mismatches": sum(a != b for a, b in zip(texts, expected)),
                          "tokens_per_request_exact": all(r.output_tokens == args.max_tokens for r in load_run.results),
                          "server_rss_mb_after_warmup": round(rss_warm, 1), "server_rss_mb_after_load": round(rss_end, 1),
                          "kv_blocks_used_after": blocks_used, "kv_blocks_free_after": blocks_free}
        report["one_at_a_time"] = {**summary(single), "outputs_equal_hf_generate":
                                   expected[:n_hf] == [tokenizer.decode(ids) for ids in hf_outputs]}
    report["throughput_ratio_concurrent_vs_one_at_a_time"] = round(load_run.output_throughput / single.output_throughput, 2)
    report["throughput_ratio_concurrent_vs_hf"] = round(load_run.output_throughput / report["hf_one_at_a_time"]["output_tok_per_s"], 2)

    # prefix caching: a shared 192-token system prompt + 16 own tokens, 16 new tokens
    n_prefix = 12 if args.quick else 48
    system = [rng.randrange(tokenizer.vocab_size) for _ in range(192)]
    shared = [system + [rng.randrange(tokenizer.vocab_size) for _ in range(16)] for _ in range(n_prefix)]
    runs: dict[bool, list] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            flags = () if on else ("--no-prefix-caching",)
            with server_process(args.model, "--max-seqs", "32", *flags) as (url, _):
                bench_serve(url, 1, prompts=shared[:1], max_tokens=16)  # the first request fills the cache
                runs[on].append((bench_serve(url, 8, prompts=shared[1:], max_tokens=16),
                                 gauge(url, "slmkit_prefix_cache_hit_rate")))
    pc = report["prefix_caching"] = {"requests": n_prefix - 1, "concurrency": 8, "rounds": args.rounds}
    for on in (False, True):
        pc["on" if on else "off"] = {**median_summary([r for r, _ in runs[on]]), "hit_rate": round(runs[on][-1][1], 3)}
    pc["outputs_equal"] = all([x.text for x in r.results] == [x.text for x in runs[False][0][0].results]
                              for r, _ in runs[False] + runs[True])
    pc["ttft_p50_ratio_off_vs_on"] = round(pc["off"]["ttft_p50_ms"] / pc["on"]["ttft_p50_ms"], 2)

    # speculative decoding: code prompts, one request at a time
    n_spec = 4 if args.quick else 24
    code = code_prompts(tokenizer, n_spec, 32, 1)
    spec: dict = {None: [], 1: []}
    for _ in range(args.rounds):
        for layers in (None, 1):
            flags = ("--draft-layers", str(layers), "--num-draft", "4") if layers else ()
            with server_process(args.model, "--max-seqs", "8", *flags) as (url, _):
                bench_serve(url, 1, prompts=code[:1], max_tokens=8)
                spec[layers].append((bench_serve(url, 1, prompts=code, max_tokens=64),
                                     gauge(url, "slmkit_speculative_acceptance_rate")))
    sp = report["speculative"] = {"requests": n_spec, "max_tokens": 64, "num_draft": 4, "rounds": args.rounds}
    sp["off"] = median_summary([r for r, _ in spec[None]])
    sp["draft_1_layer"] = {**median_summary([r for r, _ in spec[1]]), "acceptance_rate": round(spec[1][-1][1], 3)}
    sp["outputs_equal"] = all([x.text for x in r.results] == [x.text for x in spec[None][0][0].results]
                              for r, _ in spec[None] + spec[1])
    sp["speedup_output_tok_per_s"] = round(sp["draft_1_layer"]["output_tok_per_s"] / sp["off"]["output_tok_per_s"], 2)
    report["machine"]["load_avg_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
