"""Speculative decoding in the serving engine with the model's own MTP modules, against plain greedy.

Two small models with `mtp_depth` 2 are trained briefly on a repeating 7-token sequence (so that the
MTP drafts are nearly always right, the best case for speculation), then `Engine.generate` decodes
48 greedy tokens for 1 and for 8 requests, plain and with `MTPDrafter`; best of 3, tokens/s. The
outputs of both must be identical.

    .venv/bin/python bench/bench_mtp_serve.py
"""

from __future__ import annotations

import time

import torch

from slmkit.config import ModelConfig
from slmkit.model.transformer import Transformer
from slmkit.serve.engine import Engine, Request
from slmkit.serve.speculative import MTPDrafter
from slmkit.train.loop import model_losses
from slmkit.train.objectives.lm import next_token_loss

SIZES = {
    "d_model 32, 2 layers, vocab 128": dict(vocab_size=128, context_length=64, d_model=32, n_layers=2, n_heads=4,
                                            n_kv_heads=2, head_dim=8, ffn_hidden=64),
    "d_model 256, 4 layers, vocab 4096": dict(vocab_size=4096, context_length=256, d_model=256, n_layers=4, n_heads=4,
                                              n_kv_heads=2, ffn_hidden=704),
}
NEW_TOKENS = 48


def trained_on_a_cycle(size: dict, lr: float, steps: int = 60) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**size, mtp_depth=2, mtp_loss_weight=1.0)).train()
    length = model.cfg.context_length
    cycle = torch.arange(7).repeat(length)[None, :length]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        output = model(cycle[:, :-1], targets=cycle[:, 1:])
        loss = next_token_loss(output.logits, cycle[:, 1:]) + model_losses(model, output, cycle[:, 1:])[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def timed(model: Transformer, drafter: MTPDrafter | None, prompts: list[list[int]]) -> tuple[float, list, float | None]:
    best, outputs, acceptance = float("inf"), None, None
    for _ in range(3):
        engine = Engine(model, block_size=16, drafter=drafter, num_draft=2)
        start = time.perf_counter()
        outputs = engine.generate([Request(p, max_tokens=NEW_TOKENS, stop_tokens=[]) for p in prompts])
        best = min(best, time.perf_counter() - start)
        acceptance = engine.acceptance_rate if drafter else None
    return len(prompts) * NEW_TOKENS / best, outputs, acceptance


def main() -> None:
    print("| model (mtp_depth 2) | requests | plain tok/s | MTP drafter tok/s | acceptance |")
    print("|---|---:|---:|---:|---:|")
    for (name, size), lr in zip(SIZES.items(), (1e-2, 3e-3)):
        model = trained_on_a_cycle(size, lr)
        for n in (1, 8):
            prompts = [[i % 7, (i + 1) % 7, (i + 2) % 7] for i in range(n)]
            plain, expected, _ = timed(model, None, prompts)
            mtp, outputs, acceptance = timed(model, MTPDrafter(model), prompts)
            assert [o[0] for o in outputs] == [o[0] for o in expected], "speculative output differs from plain greedy"
            print(f"| {name} | {n} | {plain:,.0f} | {mtp:,.0f} | {acceptance:.2f} |")


if __name__ == "__main__":
    main()
