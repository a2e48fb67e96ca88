"""The specialization commands parse, explain themselves, and turn bad input into one line."""

from __future__ import annotations

import pytest
from specialize_fixtures import write_json

from slmkit import train_bpe
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.model.io import save_model_dir
from slmkit.model.transformer import Transformer


@pytest.mark.parametrize("argv, words", [
    (["finetune", "classify"], ["--pooling", "--train-layers", "--class-weights", "--lora-rank", "--skip-bad"]),
    (["finetune", "sft"], ["--template", "--train-on-prompt", "--max-steps", "--qlora"]),
    (["finetune", "dpo"], ["--beta", "--precompute-ref"]),
    (["finetune", "distill"], ["--teacher", "--student-preset", "--temperature", "--alpha"]),
    (["classify"], ["MODEL_DIR", "TEXT"]),
    (["lora", "merge"], ["--adapter"]),
    (["lora", "export-peft"], ["--adapter", "--base-model", "--family"]),
    (["lora", "import"], ["ADAPTER_DIR", "--name"]),
    (["eval", "judge"], ["--judge-url", "--judge-model"]),
])
def test_help(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words), [w for w in words if w not in out]


def test_chatml_template_without_its_tokens_is_one_line(tmp_path, capsys):
    tokenizer = train_bpe(["hello there"] * 3, 280, special_tokens=["<|endoftext|>", "<|pad|>"])
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=32, d_model=16,
                                                n_layers=1, n_heads=2, n_kv_heads=1))
    save_model_dir(model, tmp_path / "m", tokenizer)
    data = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}] * 4)
    assert main(["finetune", "sft", str(tmp_path / "m"), "--data", str(data), "--template", "chatml",
                 "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the chatml template needs the special tokens <|im_start|> and <|im_end|>") and err.count("\n") == 1
    assert main(["finetune", "sft", str(tmp_path / "m"), "--data", str(data), "--qlora", "--out", str(tmp_path / "run"), "-q"]) == 2
    assert "give --lora-rank R too" in capsys.readouterr().err
