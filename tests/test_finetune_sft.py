"""Instruction tuning: prompt masking in the collate output, falling validation loss, responses."""

from __future__ import annotations

import json

import pytest
from conftest import shared_path
from specialize_fixtures import tiny_model_dir, write_json

from slmkit.errors import InputError
from slmkit.finetune import finetune_sft
from slmkit.chat import ChatFormat
from slmkit.tokenizer import Tokenizer
from slmkit.finetune import FinetuneConfig
from slmkit.train.objectives.sft import (
    IGNORE,
    SupervisedFineTuning,
    build_example,
    pack_batch,
    pad_batch,
)


def test_collate_masks_the_prompt_and_padding():
    a, b = build_example([1, 2, 3], [7, 8, 9], 16), build_example([4], [5, 6], 16)
    batch = pad_batch([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 5, 0, 0, 0]]
    # targets are the next tokens; the prompt's (which predict prompt tokens) and padding's are ignored
    assert batch["targets"].tolist() == [[IGNORE, IGNORE, 7, 8, 9], [5, 6, IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    with_prompt = pad_batch([build_example([1, 2, 3], [7, 8, 9], 16, train_on_prompt=True)], 0)
    assert with_prompt["targets"].tolist() == [[2, 3, 7, 8, 9]]


def test_long_examples_keep_the_response_and_fit_the_context():
    e = build_example(list(range(10)), [20, 21, 22], max_len=6)
    assert e.ids == [6, 7, 8, 9, 20, 21, 22] and len(e.ids) == 7  # max_len + 1 (inputs and targets)
    assert e.labels == [IGNORE] * 4 + [20, 21, 22]


def test_shared_instruction_records_mask_exactly_the_template_prompt(tmp_path):
    data = json.loads(shared_path("llms-from-scratch-instruction", "instruction-data.json").read_text())[:4]
    model_dir = tiny_model_dir(tmp_path / "m", [r["instruction"] + " " + r["output"] for r in data])
    tokenizer = Tokenizer.load(model_dir)
    template = ChatFormat.from_name("alpaca", tokenizer)
    objective = SupervisedFineTuning(template, 512, tokenizer.pad_id)
    examples = objective.prepare(data)
    batch = objective.collate(examples)
    for row, record in enumerate(data):
        encoded = template.encode_record(record)
        n_prompt = len(encoded.prompt)
        targets = batch["targets"][row].tolist()
        assert targets[: n_prompt - 1] == [IGNORE] * (n_prompt - 1)
        assert targets[n_prompt - 1 : n_prompt - 1 + len(encoded.response)] == encoded.response
        assert tokenizer.decode(encoded.response[:-1]) == record["output"]


def test_sft_validation_loss_falls_and_responses_are_written(tmp_path):
    data = json.loads(shared_path("llms-from-scratch-instruction", "instruction-data.json").read_text())[:48]
    data = [r for r in data if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200][:40]
    model_dir = tiny_model_dir(tmp_path / "m", [r["instruction"] + " " + r["input"] + " " + r["output"] for r in data],
                               vocab_size=400, context_length=160)
    path = write_json(tmp_path / "data.json", data)
    cfg = FinetuneConfig(max_steps=20, lr=3e-3, warmup_steps=2, eval_every=10, batch_size=8)
    result = finetune_sft(model_dir, path, tmp_path / "run", cfg=cfg, max_new_tokens=8, max_responses=3, progress=False)
    losses = [h["loss"] for h in result.fit.history]
    assert losses[-1] < losses[0] - 0.5, losses
    rows = [json.loads(line) for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"instruction", "reference", "response"} <= set(r) for r in rows)
    assert "token_f1" in result.metrics and 0 <= result.metrics["token_f1"] <= 1
    assert json.loads((tmp_path / "run" / "final" / "generation.json").read_text())["template"] == "alpaca"
    assert (tmp_path / "run" / "report.md").read_text().startswith("# Instruction tuning report")


def test_lora_sft_writes_the_base_and_an_adapter(tmp_path):
    data = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "never")] * 3
    model_dir = tiny_model_dir(tmp_path / "m", [r["instruction"] for r in data])
    path = write_json(tmp_path / "d.json", data)
    cfg = FinetuneConfig(max_steps=4, lr=1e-3, eval_every=0, lora_rank=2)
    result = finetune_sft(model_dir, path, tmp_path / "run", cfg=cfg, max_new_tokens=4, progress=False)
    final = tmp_path / "run" / "final"
    assert (final / "adapters" / "default" / "adapter.safetensors").is_file()
    assert (final / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert result.fit.trainable < result.fit.total / 5
    from slmkit.eval.responses import eval_generate

    rows = eval_generate(final, path, tmp_path / "r.jsonl", max_new_tokens=4, limit=2, progress=False)
    assert len(rows) == 2  # the adapter and template recorded in generation.json are applied


def test_empty_response_is_a_clear_error_with_its_line(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n' * 5)
    with pytest.raises(InputError, match=rf"{path}:2: empty response"):
        finetune_sft(model_dir, path, tmp_path / "run", cfg=FinetuneConfig(max_steps=1), progress=False)
    assert not (tmp_path / "run").exists()
    result = finetune_sft(model_dir, path, tmp_path / "run", skip_bad=True, cfg=FinetuneConfig(max_steps=1, eval_every=0),
                          max_new_tokens=2, progress=False)
    assert result.skipped == 5


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
def test_packed_rows_give_each_example_its_own_logits(pos):
    """Attention and positions stop at example boundaries: every example's logits in a packed row
    equal its logits alone, and the packed loss equals the padded one."""
    import torch

    from slmkit.config import ModelConfig
    from slmkit.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=24, d_model=32, n_layers=2, n_heads=4, pos=pos)).eval()
    lengths = [(3, 5), (6, 2), (2, 9), (4, 4), (1, 3)]
    examples = [build_example(torch.randint(1, 64, (p,)).tolist(), torch.randint(1, 64, (r,)).tolist(), 24) for p, r in lengths]
    packed = pack_batch(examples, 24, pad_id=0)
    assert packed["input_ids"].shape == (2, 24)  # inputs of 7 + 7 + 10 tokens, then 7 + 3
    logits = model(packed["input_ids"], positions=packed["positions"])
    row, start, rows_used = 0, 0, {}
    for e in examples:
        n = len(e.ids) - 1
        row = next(i for i in range(2) if rows_used.get(i, 0) + n <= 24)
        start = rows_used.get(row, 0)
        rows_used[row] = start + n
        alone = model(torch.tensor([e.ids[:-1]]))[0]
        torch.testing.assert_close(logits[row, start : start + n], alone, atol=1e-5 * max(1.0, alone.abs().max().item()), rtol=0)
        assert packed["targets"][row, start : start + n].tolist() == e.labels[1:]
    padded = pad_batch(examples, pad_id=0)
    loss = lambda batch, out: torch.nn.functional.cross_entropy(out.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
    padded_logits = model(padded["input_ids"], padded["attention_mask"])
    assert loss(packed, logits).item() == pytest.approx(loss(padded, padded_logits).item(), rel=1e-5)


def test_packed_sft_trains(tmp_path):
    data = json.loads(shared_path("llms-from-scratch-instruction", "instruction-data.json").read_text())[:48]
    data = [r for r in data if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 200][:40]
    model_dir = tiny_model_dir(tmp_path / "m", [r["instruction"] + " " + r["input"] + " " + r["output"] for r in data],
                               vocab_size=400, context_length=160)
    cfg = FinetuneConfig(max_steps=12, lr=3e-3, warmup_steps=2, eval_every=6, batch_size=8)
    result = finetune_sft(model_dir, write_json(tmp_path / "data.json", data), tmp_path / "run", cfg=cfg, pack=True,
                          max_new_tokens=4, max_responses=1, progress=False)
    losses = [h["loss"] for h in result.fit.history]
    assert losses[-1] < losses[0] - 0.3, losses
