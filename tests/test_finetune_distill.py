"""Distillation: the loss, the tokenizer check, and a student that learns more from a teacher
than from the data alone with the same token budget."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_path
from specialize_fixtures import tiny_model_dir

from slmkit import train_bpe
from slmkit.data import prepare
from slmkit.errors import InputError
from slmkit.finetune import finetune_distill
from slmkit.train import TrainConfig, pretrain
from slmkit.finetune import FinetuneConfig
from slmkit.train.objectives.distill import distillation_loss


def test_loss_is_zero_kl_for_identical_logits_and_pure_ce_at_alpha_zero():
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    total, kl, ce = distillation_loss(logits, logits, targets, temperature=2.0, alpha=0.5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.5 * ce.item(), rel=1e-6)
    total, _, ce = distillation_loss(logits, torch.randn(2, 3, 7), targets, temperature=2.0, alpha=0.0)
    assert total.item() == pytest.approx(ce.item())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    text = shared_path("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:120_000]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(0, len(text), 6000):  # documents, so that some go to the validation split
        (corpus / f"{i:06d}.txt").write_text(text[i : i + 6000], encoding="utf-8")
    tokenizer = train_bpe([corpus], 384)
    tokenizer.save(root / "tokenizer")
    prepare([corpus], tokenizer, root / "shards", val_fraction=0.1, dedup="none", min_chars=1, progress=False)
    return root


def train_teacher(shards, steps: int):
    cfg = TrainConfig(data=str(shards / "shards"), out=str(shards / f"teacher-{steps}"), tokenizer=str(shards / "tokenizer"),
                      model={"vocab_size": 384, "context_length": 64, "d_model": 96, "n_layers": 3, "n_heads": 4,
                             "n_kv_heads": 2}, max_steps=steps, batch_size=16, lr=3e-3, warmup_steps=10,
                      eval_every=0, save_every=0, log_every=50, peak_flops=1e11)
    pretrain(cfg, progress=False)
    return shards / f"teacher-{steps}" / "final"


STUDENT = {"context_length": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1}


def test_student_moves_toward_the_teacher(shards):
    teacher = train_teacher(shards, 20)
    cfg = FinetuneConfig(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1)
    result = finetune_distill(teacher, shards / "shards", shards / "student-quick", student_preset="tiny", student_overrides=STUDENT,
                              temperature=2.0, alpha=1.0, cfg=cfg, progress=False)
    import json

    kl = [json.loads(line)["kl"] for line in (shards / "student-quick" / "metrics.jsonl").read_text().splitlines() if '"kl"' in line]
    assert len(kl) == 20 and sum(kl[-5:]) < 0.7 * sum(kl[:5]), kl
    assert result.fit.history[-1]["loss"] < result.fit.history[0]["loss"]


@pytest.mark.slow
def test_student_distilled_from_a_larger_teacher_beats_the_same_student_alone(shards):
    """Same student, same seed, same 200 x 8 x 64 tokens: with the teacher (alpha 0.9, T 1) it
    reached val loss 4.06 here, alone 4.20 (teacher: 3.65)."""
    teacher = train_teacher(shards, 300)
    results = {}
    for alpha in (0.0, 0.9):  # alpha 0 is plain next-token training: the teacher's logits carry no weight
        cfg = FinetuneConfig(max_steps=200, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, seed=1)
        results[alpha] = finetune_distill(teacher, shards / "shards", shards / f"student-{alpha}", student_preset="tiny",
                                          student_overrides=STUDENT, temperature=1.0, alpha=alpha, cfg=cfg,
                                          progress=False).fit.best["loss"]
    assert results[0.9] < results[0.0] - 0.05, results


def test_teacher_and_student_must_share_a_tokenizer(shards, tmp_path):
    other = tiny_model_dir(tmp_path / "other")
    with pytest.raises(InputError, match="use different tokenizers"):
        finetune_distill(other, shards / "shards", tmp_path / "run", student_dir=tiny_model_dir(tmp_path / "s", ["x y z"] * 5),
                         progress=False)
    with pytest.raises(InputError, match="exactly one of --student"):
        finetune_distill(other, shards / "shards", tmp_path / "run", progress=False)
