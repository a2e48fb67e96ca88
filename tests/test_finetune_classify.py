"""Classification: pooling, layer freezing, training on SMS spam, the classifier directory,
`slmkit classify`, and clear errors for bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import shared_path
from specialize_fixtures import TEXTS, tiny_model_dir

import slmkit
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.finetune import finetune_classify
from slmkit.model.classifier import SequenceClassifier, encode_texts, pool
from slmkit.model.transformer import Transformer
from slmkit.finetune import FinetuneConfig


def test_pooling_reads_the_right_positions():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert pool(hidden, mask, "last").flatten().tolist() == [2.0, 7.0]
    assert pool(hidden, mask, "first").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [1.0, 5.5]


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_padding_does_not_change_a_texts_logits(tmp_path, pooling):
    from slmkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_model_dir(tmp_path / "m"))
    torch.manual_seed(0)
    model = SequenceClassifier(Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=64,
                                                                   d_model=32, n_layers=2, n_heads=2, n_kv_heads=1)),
                               ["a", "b", "c"], pooling).eval()
    texts = ["win a prize", "ok see you at home later, love you"]
    ids, mask = encode_texts(tokenizer, texts, 64)
    assert mask[0].sum() < mask[1].sum()
    batched = model(ids, mask)
    alone = model(*encode_texts(tokenizer, texts[:1], 64))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5 * max(1.0, alone.abs().max().item()), rtol=0)


def test_freeze_modes():
    model = SequenceClassifier(Transformer(ModelConfig.from_preset("tiny", vocab_size=64, context_length=16, d_model=16,
                                                                   n_layers=3, n_heads=2, n_kv_heads=1)), ["a", "b"])
    model.freeze("head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"score.weight", "score.bias"}
    model.freeze("last-1")
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.layers")}
    assert trained == {"2"}
    with pytest.raises(InputError, match="last-N needs 1 <= N <= 3"):
        model.freeze("last-7")


def sms_subset(tmp_path, n: int = 240):
    lines = shared_path("sms-spam-collection", "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    spam = [x for x in lines if x.startswith("spam")][: n // 3]
    ham = [x for x in lines if x.startswith("ham")][: n - len(spam)]
    path = tmp_path / "sms.tsv"
    rows = spam + ham
    random.Random(0).shuffle(rows)  # str hashes change per process; the split must not
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, [x.split("\t", 1)[1] for x in spam + ham]


def test_sms_spam_training_learns_and_writes_a_classifier_directory(tmp_path):
    data, texts = sms_subset(tmp_path)
    model_dir = tiny_model_dir(tmp_path / "m", texts, vocab_size=400)
    cfg = FinetuneConfig(max_steps=80, lr=3e-3, warmup_steps=4, eval_every=20, batch_size=16)
    result = finetune_classify(model_dir, data, tmp_path / "run", text_field="1", label_field="0", fmt="tsv",
                               test_fraction=0.25, class_weights="balanced", max_length=48, cfg=cfg, progress=False)
    history = result.fit.history
    assert history[0]["step"] == 0
    # a third of the messages are spam: predicting the majority class scores about 0.67
    assert result.metrics["accuracy"] >= 0.8, result.metrics
    assert set(result.metrics["per_class"]) == {"ham", "spam"}
    assert sum(map(sum, result.metrics["confusion"])) == 60
    run = tmp_path / "run"
    assert json.loads((run / "final" / "labels.json").read_text())["labels"] == ["ham", "spam"]
    assert "| **spam** |" in (run / "confusion.md").read_text()
    classifier = slmkit.load_classifier(run / "final")
    probs = classifier.predict_proba("WINNER!! claim your free prize, call now")
    assert abs(sum(probs.values()) - 1) < 1e-5
    assert classifier.predict(["a", "b"]) == [classifier.predict("a"), classifier.predict("b")]


def test_lora_classifier_trains_few_parameters_and_cli_predicts(tmp_path, capsys):
    data, texts = sms_subset(tmp_path, 120)
    model_dir = tiny_model_dir(tmp_path / "m", texts, vocab_size=400, d_model=64, n_heads=4, n_kv_heads=2)
    assert main(["finetune", "classify", str(model_dir), "--train", str(data), "--format", "tsv", "--text-field", "1",
                 "--label-field", "0", "--out", str(tmp_path / "run"), "--max-steps", "4", "--eval-every", "0",
                 "--lora-rank", "2", "-q"]) == 0
    out = capsys.readouterr().out
    share = float(out.split("(")[2].split("%")[0])
    assert share < 5.0, out
    final = tmp_path / "run" / "final"
    assert (final / "adapters" / "default" / "adapter_config.json").is_file()
    assert main(["classify", str(final), "free prize call now"]) == 0
    line = capsys.readouterr().out.strip()
    label, *probs = line.split()
    assert label in ("ham", "spam") and [p.split("=")[0] for p in probs] == ["ham", "spam"]
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(final), "--out", str(merged)]) == 0
    a, b = slmkit.load_classifier(final), slmkit.load_classifier(merged)
    pa, pb = a.probabilities(["free prize call now", "see you later"]), b.probabilities(["free prize call now", "see you later"])
    torch.testing.assert_close(pa, pb, atol=1e-5, rtol=0)


def test_bad_input_errors(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "m", TEXTS)
    f = tmp_path / "d.csv"
    f.write_text("text,label\nhello,a\nbye,b\n" * 3, encoding="utf-8")
    with pytest.raises(InputError, match=r"no column named 'category'"):
        finetune_classify(model_dir, f, tmp_path / "run", label_field="category", cfg=FinetuneConfig(max_steps=1), progress=False)
    test = tmp_path / "t.csv"
    test.write_text("text,label\nhi,c\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{test}:2: label 'c' does not occur in the training data"):
        finetune_classify(model_dir, f, tmp_path / "run", test=test, cfg=FinetuneConfig(max_steps=1), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "b"\n' * 2, encoding="utf-8")
    assert main(["finetune", "classify", str(model_dir), "--train", str(bad), "--out", str(tmp_path / "r2"), "-q"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:3: invalid JSON (Expecting ',' delimiter at column 13) (pass --skip-bad to skip bad records)"
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_sms_spam_acceptance(tmp_path):
    """The benchmark's path at its settings: a `tiny` model pretrained here on the training
    messages, then full fine-tuning >= 95% and LoRA (< 5% of parameters) >= 93% test accuracy
    on the fixed split (20% test, seed 0)."""
    import importlib.util
    from pathlib import Path

    shared_path("sms-spam-collection", "SMSSpamCollection")
    spec = importlib.util.spec_from_file_location("bench_specialize", Path(__file__).parents[1] / "bench" / "bench_specialize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = bench.pretrain_base(tmp_path, minutes=4.0, steps=1500)
    full = bench.run_variant(base, tmp_path, "full", steps=500)
    lora = bench.run_variant(base, tmp_path, "lora", steps=500)
    assert full["test_accuracy"] >= 0.95, full
    assert lora["test_accuracy"] >= 0.93 and lora["trainable_fraction"] < 0.05, lora
