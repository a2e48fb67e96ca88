"""deepseek-tiny trained on tinyshakespeare: loss falls and auxiliary-loss-free balancing keeps every
MoE layer's expert load within 1.5x of the mean by the end of a short run."""

from __future__ import annotations

import pytest
from conftest import shared_path
from train_helpers import losses, make_data, run

STEPS = 100


@pytest.mark.slow
def test_deepseek_tiny_balances_experts_on_tinyshakespeare(tmp_path) -> None:
    text = shared_path("tinyshakespeare/input.txt").read_text(encoding="utf-8")[:300_000]
    data = make_data(text, tmp_path, vocab_size=512)
    records = run(data, tmp_path / "run", preset="deepseek-tiny", max_steps=STEPS, batch_size=16, lr=3e-3,
                  model={"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "context_length": 64})
    curve = losses(records)
    final = [r["moe_max_mean"] for r in records if "moe_max_mean" in r][-1]  # 3 MoE layers + the MTP block
    print(f"loss {curve[0]:.3f} -> {curve[-1]:.3f}; final per-layer max/mean load {[round(v, 2) for v in final]}")
    assert curve[-1] < curve[0] - 1.5
    assert len(final) == 4 and max(final) <= 1.5
