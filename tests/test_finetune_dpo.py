"""DPO on the shared preference data: held-out reward accuracy above chance, margins that grow,
and the three kinds of reference (frozen copy, adapters off, precomputed) agreeing at the start."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_path
from specialize_fixtures import tiny_model_dir, write_json

from slmkit.errors import InputError
from slmkit.finetune import finetune_dpo
from slmkit.train.objectives.dpo import (
    preference_loss,
    preference_messages,
    sequence_logps,
)


def preference_data(tmp_path, n: int):
    data = json.loads(shared_path("llms-from-scratch-dpo", "instruction-data-with-preference.json").read_text())
    data = [r for r in data if len(r["instruction"]) + len(r["input"]) + max(len(r["chosen"]), len(r["rejected"])) < 220][:n]
    texts = [f"{r['instruction']} {r['input']} {r['chosen']} {r['rejected']}" for r in data]
    return write_json(tmp_path / "pref.json", data), texts


def test_sequence_logps_counts_only_response_tokens():
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[-100, 2, 4]])
    logp = logits.log_softmax(-1)
    assert torch.allclose(sequence_logps(logits, targets), logp[0, 1, 2] + logp[0, 2, 4])
    equal = torch.zeros(4)
    assert preference_loss(equal, equal).item() == pytest.approx(0.6931, abs=1e-4)  # log 2 before any training


def test_record_shapes():
    assert preference_messages({"prompt": "p", "chosen": "a", "rejected": "b"})[0]["instruction"] == "p"
    prompt, chosen, _ = preference_messages({"instruction": "i", "input": "x", "chosen": "a", "rejected": "b", "_source": "f:1"})
    assert prompt == {"instruction": "i", "input": "x", "_source": "f:1"} and chosen == "a"
    with pytest.raises(InputError, match="f:3: a preference record needs non-empty `chosen` and `rejected`"):
        preference_messages({"prompt": "p", "chosen": "a", "rejected": " ", "_source": "f:3"})


def test_dpo_reward_accuracy_and_margins_rise_on_held_out_pairs(tmp_path):
    data, texts = preference_data(tmp_path, 100)
    model_dir = tiny_model_dir(tmp_path / "m", texts, vocab_size=400, context_length=160)
    from slmkit.finetune import FinetuneConfig

    cfg = FinetuneConfig(max_steps=24, lr=2e-3, warmup_steps=2, eval_every=12, batch_size=8)
    result = finetune_dpo(model_dir, data, tmp_path / "run", beta=0.1, val_fraction=0.2, cfg=cfg, progress=False)
    history = result.fit.history
    assert [h["step"] for h in history] == [0, 12, 24]
    assert history[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert history[-1]["reward_accuracy"] > 0.5, history
    assert history[-1]["margin"] > history[1]["margin"] > 0, history
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(logged[1])


def test_precomputed_and_adapter_references_match_the_frozen_copy_at_the_start(tmp_path):
    data, texts = preference_data(tmp_path, 20)
    model_dir = tiny_model_dir(tmp_path / "m", texts, vocab_size=400, context_length=160)
    from slmkit.finetune import FinetuneConfig

    runs = {
        "copy": finetune_dpo(model_dir, data, tmp_path / "a", cfg=FinetuneConfig(max_steps=1, eval_every=0), progress=False),
        "pre": finetune_dpo(model_dir, data, tmp_path / "b", precompute_ref=True, cfg=FinetuneConfig(max_steps=1, eval_every=0), progress=False),
        "lora": finetune_dpo(model_dir, data, tmp_path / "c", cfg=FinetuneConfig(max_steps=1, eval_every=0, lora_rank=2), progress=False),
    }
    for result in runs.values():
        assert result.fit.history[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
