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
from slmkit.train.finetune import FinetuneConfig
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


def test_student_distilled_from_a_larger_teacher_beats_the_same_student_alone(shards):
    teacher_cfg = TrainConfig(data=str(shards / "shards"), out=str(shards / "teacher"), tokenizer=str(shards / "tokenizer"),
                              model={"vocab_size": 384, "context_length": 64, "d_model": 96, "n_layers": 3, "n_heads": 4,
                                     "n_kv_heads": 2}, max_steps=200, batch_size=16, lr=3e-3, warmup_steps=10,
                              eval_every=0, save_every=0, log_every=50, peak_flops=1e11)
    pretrain(teacher_cfg, progress=False)
    teacher = shards / "teacher" / "final"
    student = {"context_length": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1}
    results = {}
    for alpha in (0.0, 0.7):  # alpha 0 is plain next-token training: the teacher's logits carry no weight
        cfg = FinetuneConfig(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, seed=1)
        results[alpha] = finetune_distill(teacher, shards / "shards", shards / f"student-{alpha}", student_preset="tiny",
                                          student_overrides=student, temperature=2.0, alpha=alpha, cfg=cfg,
                                          progress=False).fit.best["loss"]
    assert results[0.7] < results[0.0] - 0.02, results


def test_teacher_and_student_must_share_a_tokenizer(shards, tmp_path):
    other = tiny_model_dir(tmp_path / "other")
    with pytest.raises(InputError, match="use different tokenizers"):
        finetune_distill(other, shards / "shards", tmp_path / "run", student_dir=tiny_model_dir(tmp_path / "s", ["x y z"] * 5),
                         progress=False)
    with pytest.raises(InputError, match="exactly one of --student"):
        finetune_distill(other, shards / "shards", tmp_path / "run", progress=False)
