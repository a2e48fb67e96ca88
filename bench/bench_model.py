"""Model benchmark: slmkit's Transformer against Hugging Face transformers, same run, same machine.

Both sides are built from one architecture, the HF weights are copied into slmkit (and the logits
checked equal), so they compute the same function. Timed:

  training  forward + cross-entropy + backward + AdamW step (same settings, all parameters), in
            fp32 and under bf16 autocast; tokens/s and MFU (training FLOPs = 3 x forward FLOPs of
            `slmkit.model.inspect.forward_flops_per_token`) against the matmul peak measured here.
  decode    greedy, batch 1, a 32-token prompt then 128 new tokens through the KV cache:
            `slmkit.generation.generate_ids` (greedy) vs HF `generate(do_sample=False)`;
            both must produce the same tokens.

Runs are interleaved (slmkit, HF, slmkit, ...) and reported as medians after a warm-up.

    .venv/bin/python bench/bench_model.py --repeats 5
    .venv/bin/python bench/bench_model.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

import slmkit
from slmkit.config import ModelConfig
from slmkit.generation.api import generate_ids
from slmkit.model import Transformer
from slmkit.model.inspect import forward_flops_per_token


@dataclass
class Case:
    name: str
    cfg: ModelConfig
    batch_size: int


CASES = [
    Case("tiny (llama, 5.3M)", ModelConfig.from_preset("tiny"), 8),
    Case("gpt2-small, 2 layers (53M)", ModelConfig.from_preset("gpt2-small", n_layers=2, context_length=256), 4),
]


# ---------------------------------------------------------------------------- the HF twin
def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    """The transformers model of the same architecture (Llama for rope/rmsnorm/swiglu, else GPT-2)."""
    if cfg.pos == "rope":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias,
            bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def slmkit_weights(hf: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> slmkit names (GPT-2: transpose Conv1D weights, split the fused c_attn)."""
    state = hf.state_dict()
    if cfg.pos == "rope":
        return {name.removeprefix("model."): w for name, w in state.items()}
    out = {"embed_tokens.weight": state["transformer.wte.weight"], "pos.wpe.weight": state["transformer.wpe.weight"],
           "norm.weight": state["transformer.ln_f.weight"], "norm.bias": state["transformer.ln_f.bias"]}
    for i in range(cfg.n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"input_layernorm.{kind}"] = state[src + f"ln_1.{kind}"]
            out[dst + f"post_attention_layernorm.{kind}"] = state[src + f"ln_2.{kind}"]
        qkv_w = state[src + "attn.c_attn.weight"].t().chunk(3)
        qkv_b = state[src + "attn.c_attn.bias"].chunk(3)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"], out[dst + f"self_attn.{name}.bias"] = qkv_w[j], qkv_b[j]
        for hf_name, name in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            out[dst + f"{name}.weight"] = state[src + f"{hf_name}.weight"].t()
            out[dst + f"{name}.bias"] = state[src + f"{hf_name}.bias"]
    return out


def twins(cfg: ModelConfig, seed: int = 0) -> tuple[Transformer, torch.nn.Module]:
    torch.manual_seed(seed)
    hf = hf_model(cfg)
    ours = Transformer(cfg)
    ours.load_state_dict({k: v.clone() for k, v in slmkit_weights(hf, cfg).items()}, strict=not cfg.tie_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        diff = (ours.eval()(ids) - hf.eval()(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"slmkit and HF disagree for {cfg}: max |logit diff| {diff}")
    return ours, hf


# ---------------------------------------------------------------------------- timing helpers
def load() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to max_wait s) for the 1-minute load average to drop to max_load; return it."""
    deadline = time.time() + max_wait
    while load() > max_load and time.time() < deadline:
        time.sleep(10)
    return load()


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each fn once to warm up, then `repeats` rounds in turn; fns return seconds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of an n x n matmul (median)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b

    def run() -> float:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    return 2 * n**3 / statistics.median(run() for _ in range(repeats)) / 1e9


# ---------------------------------------------------------------------------- training
def train_step_fn(model: torch.nn.Module, is_hf: bool, ids: torch.Tensor, bf16: bool, steps: int) -> Callable[[], float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                logits = model(inputs).logits if is_hf else model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps

    return run


def bench_training(case: Case, repeats: int, steps: int, peaks: dict[str, float], precisions: list[str]) -> list[dict]:
    cfg, b = case.cfg, case.batch_size
    t = cfg.context_length
    ids = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(0))
    flops_per_token = 3 * forward_flops_per_token(cfg, t)
    rows = []
    for precision in precisions:
        ours, hf = twins(cfg)
        times = interleaved({
            "slmkit": train_step_fn(ours, False, ids, precision == "bf16", steps),
            "hf": train_step_fn(hf, True, ids, precision == "bf16", steps),
        }, repeats)
        tok_s = {name: b * t / statistics.median(ts) for name, ts in times.items()}
        rows.append({
            "case": case.name, "precision": precision, "batch": b, "seq": t,
            "slmkit_tok_s": tok_s["slmkit"], "hf_tok_s": tok_s["hf"], "ratio": tok_s["slmkit"] / tok_s["hf"],
            "slmkit_mfu_fp32_peak": tok_s["slmkit"] * flops_per_token / (peaks["fp32"] * 1e9),
            "hf_mfu_fp32_peak": tok_s["hf"] * flops_per_token / (peaks["fp32"] * 1e9),
            "slmkit_mfu_own_peak": tok_s["slmkit"] * flops_per_token / (peaks[precision] * 1e9),
            "times_s": times,
        })
    return rows


# ---------------------------------------------------------------------------- decode
def slmkit_greedy(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """slmkit's own generation API (the loop `slmkit generate` runs), greedy, no stop tokens."""
    (ids,) = generate_ids(model, prompt.tolist(), max_new_tokens=new_tokens)
    return torch.tensor([ids])


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def bench_decode(case: Case, repeats: int, prompt_len: int, new_tokens: int) -> dict:
    ours, hf = twins(case.cfg)  # both in eval mode
    prompt = torch.randint(1, case.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    same = torch.equal(slmkit_greedy(ours, prompt, new_tokens), hf_greedy(hf, prompt, new_tokens))

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return run

    times = interleaved({
        "slmkit": timed(lambda: slmkit_greedy(ours, prompt, new_tokens)),
        "hf": timed(lambda: hf_greedy(hf, prompt, new_tokens)),
    }, repeats)
    tok_s = {name: new_tokens / statistics.median(ts) for name, ts in times.items()}
    return {"case": case.name, "prompt": prompt_len, "new_tokens": new_tokens, "same_tokens": same,
            "slmkit_tok_s": tok_s["slmkit"], "hf_tok_s": tok_s["hf"], "ratio": tok_s["slmkit"] / tok_s["hf"],
            "times_s": times}


# ---------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    peaks = result["peaks_gflops"]
    header = (f"Measured {result['date']} on {result['machine']}; torch {result['torch']}, transformers "
              f"{result['transformers']}, slmkit {result['slmkit']}, {result['threads']} threads; load average "
              f"{result['load_start']:.2f} at start, {result['load_end']:.2f} at end. Matmul peak measured in the "
              f"same run: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s (CPU capability "
              f"{result['cpu_capability']}).")
    skipped = ("bf16 autocast rows are skipped: this CPU has no native bf16 matmul, so bf16 would be "
               "~100x slower than fp32 for both sides.")
    lines = [
        header,
        *([] if "bf16" in result["precisions"] else ["", skipped]),
        "",
        "Training (forward + backward + AdamW step), tokens/s, median:",
        "",
        "| model | precision | batch x seq | slmkit tok/s | HF tok/s | slmkit / HF | slmkit MFU (fp32 peak) | HF MFU (fp32 peak) | slmkit MFU (own-precision peak) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["training"]:
        lines.append(f"| {r['case']} | {r['precision']} | {r['batch']} x {r['seq']} | {r['slmkit_tok_s']:,.0f} | "
                     f"{r['hf_tok_s']:,.0f} | {r['ratio']:.2f}x | {r['slmkit_mfu_fp32_peak']:.0%} | "
                     f"{r['hf_mfu_fp32_peak']:.0%} | {r['slmkit_mfu_own_peak']:.0%} |")
    lines += ["", "Decode, greedy, batch 1, tokens/s, median:", "",
              "| model | prompt + new | slmkit generate tok/s | HF generate tok/s | slmkit / HF | same tokens |",
              "|---|---|---:|---:|---:|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['case']} | {r['prompt']} + {r['new_tokens']} | {r['slmkit_tok_s']:,.0f} | "
                     f"{r['hf_tok_s']:,.0f} | {r['ratio']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (default: 5)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed round (default: 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, tiny model only")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait for the 1-min load average to drop to this")
    parser.add_argument("--max-wait", type=float, default=300.0, help="but wait at most this many seconds (default: 300)")
    parser.add_argument("--only", choices=["train", "decode"], help="run one half only")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    cases = CASES[:1] if args.quick else CASES
    repeats = 1 if args.quick else args.repeats

    load_start = wait_for_quiet(args.max_load, args.max_wait)
    peaks = {"fp32": matmul_peak(torch.float32, 1024 if args.quick else 3072, repeats + 2)}
    # CPUs without avx512_bf16/AMX emulate bf16 matmul (~1 GFLOP/s): probe small before timing big
    peaks["bf16"] = matmul_peak(torch.bfloat16, 512, 3)
    precisions = ["fp32"]
    if peaks["bf16"] > peaks["fp32"] / 4:
        peaks["bf16"] = matmul_peak(torch.bfloat16, 1024 if args.quick else 3072, repeats + 2)
        precisions.append("bf16")
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__, "transformers": transformers.__version__, "slmkit": slmkit.__version__,
        "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_start": load_start, "peaks_gflops": peaks, "precisions": precisions,
        "training": [], "decode": [],
    }
    for case in cases:
        if args.only != "decode":
            wait_for_quiet(args.max_load, args.max_wait)
            for row in bench_training(case, repeats, 1 if args.quick else args.steps, peaks, precisions):
                result["training"].append(row)
                print(f"train  {row['case']:<28} {row['precision']}: slmkit {row['slmkit_tok_s']:,.0f} tok/s, "
                      f"HF {row['hf_tok_s']:,.0f} tok/s, {row['ratio']:.2f}x", flush=True)
        if args.only != "train":
            wait_for_quiet(args.max_load, args.max_wait)
            row = bench_decode(case, repeats, prompt_len=32, new_tokens=16 if args.quick else 128)
            result["decode"].append(row)
            print(f"decode {row['case']:<28}: slmkit {row['slmkit_tok_s']:,.0f} tok/s, HF {row['hf_tok_s']:,.0f} tok/s, "
                  f"{row['ratio']:.2f}x, same tokens: {row['same_tokens']}", flush=True)
    result["load_end"] = load()
    print()
    print(markdown(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
