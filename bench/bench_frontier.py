"""What each frontier technique buys at tiny scale on a CPU, measured in one run on one machine.

  kv cache   bytes per token of MHA, GQA and MLA models of equal width (measured on the caches, and the
             analytic ratio of the full-size DeepSeek-V3 configuration against MHA of its width)
  moe        a Mixtral-style MoE against a dense model with equal active parameters: total and active
             parameters, training tokens/s and loss after equal steps on tinyshakespeare (bytes as tokens)
  mtp        a DeepSeek-style model (MLA + MoE + 1 MTP module) trained the same way: acceptance rate of
             its self-speculative drafts and greedy decode tokens/s against plain greedy (same tokens)
  fp8        training step time with FP8 emulation (blockwise, per-tensor) against fp32

    .venv/bin/python bench/bench_frontier.py              # ~10 minutes on 2 cores
    .venv/bin/python bench/bench_frontier.py --steps 20   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slmkit.config import ModelConfig
from slmkit.generation.decode import sample
from slmkit.generation.sampling import SamplingParams
from slmkit.model import Transformer
from slmkit.model.inspect import count_parameters, kv_cache_comparison
from slmkit.model.moe import balance_step
from slmkit.model.mtp import speculative_greedy
from slmkit.train.loop import model_losses
from slmkit.train.objectives.lm import next_token_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare"
BASE = dict(vocab_size=256, context_length=128, d_model=128, n_layers=4, n_heads=4, norm="rmsnorm", mlp="swiglu",
            pos="rope", tie_embeddings=False)


def text_bytes() -> torch.Tensor:
    path = next(DATA.glob("*.txt"))
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


def train(cfg: ModelConfig, data: torch.Tensor, steps: int, batch: int, seed: int = 0) -> dict:
    """AdamW on random windows; returns tokens/s (median step) and the mean loss of the last 10 steps."""
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses, times, balance = [], [], []
    t = cfg.context_length
    for _ in range(steps):
        starts = torch.randint(0, len(data) - t - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + t + 1] for s in starts])
        start = time.perf_counter()
        output = model(window[:, :-1], targets=window[:, 1:])
        loss = next_token_loss(output.logits, window[:, 1:])
        extra, _ = model_losses(model, output, window[:, 1:])
        (loss if extra is None else loss + extra).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        stats = balance_step(model, [output.expert_load])
        if stats:
            balance.append(max(stats["moe_max_mean"]))
        losses.append(loss.item())
    return {"model": model.eval(), "tok_s": batch * t / statistics.median(times[2:] or times),
            "loss": statistics.mean(losses[-10:]), "final_max_mean": balance[-1] if balance else None}


def kv_cache_section() -> dict:
    width = dict(BASE, d_model=256, n_heads=8)
    variants = {"mha": dict(width), "gqa (2 kv heads)": dict(width, n_kv_heads=2),
                "mla (r=64, rope=16)": dict(width, attention_kind="mla", kv_lora_rank=64, qk_nope_head_dim=32,
                                            qk_rope_head_dim=16, v_head_dim=32)}
    out = {}
    for name, values in variants.items():
        model = Transformer(ModelConfig(**values)).eval()
        cache = model.new_cache(1, max_len=100)
        nbytes = cache.nbytes() if hasattr(cache, "nbytes") else cache.k.nbytes + cache.v.nbytes
        out[name] = {"bytes_per_token_fp32": nbytes / 100}
    mha = out["mha"]["bytes_per_token_fp32"]
    for v in out.values():
        v["vs_mha"] = mha / v["bytes_per_token_fp32"]
    ds = ModelConfig.from_preset("deepseek-v3-671b")
    out["deepseek-v3-671b"] = {"bytes_per_token_bf16": kv_cache_comparison(ds)["elements"] * 2, **kv_cache_comparison(ds)}
    return out


def decode_speed(model: Transformer, prompt: list[int], n: int, repeats: int = 3) -> dict:
    plain, spec = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        greedy = [int(t) for t in sample(model, [prompt], SamplingParams(temperature=0.0), max_new_tokens=n)]
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = speculative_greedy(model, prompt, max_new_tokens=n)
        spec.append(time.perf_counter() - start)
    assert result.tokens == greedy, "speculative decoding must reproduce greedy decoding"
    return {"acceptance_rate": result.acceptance_rate, "tokens": len(greedy),
            "main_forward_passes": result.forward_passes, "greedy_tok_s": len(greedy) / statistics.median(plain),
            "speculative_tok_s": len(greedy) / statistics.median(spec),
            "speedup": statistics.median(plain) / statistics.median(spec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = text_bytes()
    results: dict = {"threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch,
                     "kv_cache": kv_cache_section()}

    expert = 128
    moe = ModelConfig(**BASE, ffn_kind="moe", n_experts=8, n_experts_per_tok=2, moe_ffn_hidden=expert, aux_loss_coef=0.01)
    dense = ModelConfig(**BASE, ffn_hidden=2 * expert + (BASE["d_model"] * 8 // 1024))  # equal active FFN width (+ router)
    section = {}
    for name, cfg in (("dense", dense), ("moe 8x top-2", moe)):
        run = train(cfg, data, args.steps, args.batch)
        p = count_parameters(cfg)
        section[name] = {"total_params": p.total, "active_params": p.active, "tok_s": run["tok_s"], "loss": run["loss"],
                         "final_max_mean_load": run["final_max_mean"]}
    results["moe_vs_dense"] = section

    deepseek = ModelConfig(**{**BASE, **dict(attention_kind="mla", q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                                             qk_rope_head_dim=16, v_head_dim=32, ffn_hidden=256, ffn_kind="moe", n_experts=8,
                                             n_experts_per_tok=2, n_shared_experts=1, moe_ffn_hidden=64, first_k_dense=1,
                                             router_score="sigmoid", router_bias_rate=1e-3, mtp_depth=1)})
    run = train(deepseek, data, args.steps, args.batch)
    prompt = data[:32].tolist()
    results["mtp"] = {"train_loss": run["loss"], "final_max_mean_load": run["final_max_mean"],
                      **decode_speed(run["model"], prompt, n=96)}

    fp8 = {}
    for name in ("none", "tensor", "blockwise"):
        fp8[name] = train(ModelConfig(**BASE, fp8=name), data, max(5, args.steps // 10), args.batch)["tok_s"]
    results["fp8_train_tok_s"] = {**fp8, "blockwise_overhead": fp8["none"] / fp8["blockwise"],
                                  "tensor_overhead": fp8["none"] / fp8["tensor"]}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
