"""Trainer pieces without data: LR schedule, weight-decay groups, objectives, precision, config."""

from __future__ import annotations

import math

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model import Transformer
from slmkit.train import TrainConfig, lr_at
from slmkit.train.run_metrics import flops_per_token
from slmkit.train.objectives import LanguageModeling, MaskedLanguageModeling
from slmkit.train.objectives.lm import next_token_loss
from slmkit.train.optim import param_groups
from slmkit.train.precision import resolve_precision


def test_lr_schedule_warmup_cosine_floor():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # halfway: mean of peak and floor
    assert lr_at(35, **kw) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(500, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("preset", [dict(norm="layernorm", pos="learned", attn_bias=True, mlp_bias=True), dict(tie_embeddings=False)])
def test_no_weight_decay_on_norms_biases_embeddings(preset):
    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, **preset))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decayed)
    assert "embed_tokens.weight" in skipped
    assert all("norm" in n or n.endswith("bias") or "embed" in n or "wpe" in n for n in skipped)
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_lm_objective_is_next_token_cross_entropy():
    x, y = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])
    inputs, targets = LanguageModeling().batch(x, y)
    assert inputs is x and targets is y
    logits = torch.zeros(1, 3, 8)
    assert next_token_loss(logits, targets).item() == pytest.approx(math.log(8))
    batch = LanguageModeling().collate(list(zip(inputs, targets)))
    assert torch.equal(batch["input_ids"], x) and torch.equal(batch["targets"], y)


def test_mlm_masks_15_percent_80_10_10():
    mlm = MaskedLanguageModeling(mask_id=99, vocab_size=50, seed=0)
    x = torch.randint(0, 50, (64, 256), generator=torch.Generator().manual_seed(1))
    inputs, targets = mlm.batch(x, x)
    chosen = targets != -100
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(targets[chosen], x[chosen])
    masked = (inputs == 99)[chosen].float().mean().item()
    kept = (inputs == x)[chosen].float().mean().item()  # 10% unchanged + random hits of the same id
    assert masked == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / 50, abs=0.02)
    assert torch.equal(inputs[~chosen], x[~chosen])
    again = MaskedLanguageModeling(mask_id=99, vocab_size=50, seed=0)
    again.load_state_dict(MaskedLanguageModeling(99, 50, seed=0).state_dict())
    assert torch.equal(again.batch(x, x)[0], inputs)  # seeded and resumable


def test_flops_per_token_counts_non_embedding_and_attention():
    cfg = ModelConfig(vocab_size=100, context_length=32, d_model=64, n_layers=2, n_heads=4)
    model = Transformer(cfg)
    expected = 6 * (model.num_parameters(embedding=False) + 64 * 100) + 12 * 2 * 4 * 16 * 32
    assert flops_per_token(model) == expected


def test_precision_choices_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert not resolve_precision("bf16", cpu).scaler().is_enabled()
    with pytest.raises(InputError, match="fp16"):
        resolve_precision("fp16", cpu)


def test_train_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(InputError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"data": "d", "out": "o", "max_step": 3})
    with pytest.raises(InputError, match="missing required"):
        TrainConfig.from_dict({"data": "d"})
    with pytest.raises(InputError, match="batch_size"):
        TrainConfig(data="d", out="o", batch_size=0)
    with pytest.raises(InputError, match="precision"):
        TrainConfig(data="d", out="o", precision="fp8")
