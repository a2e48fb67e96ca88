"""ONNX export: logits within 1e-4 of PyTorch, identical greedy output through ONNX Runtime,
ORT quantization, the CLI. One export per test module (it takes tens of seconds), shared by its tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.errors import ExportError, InputError

pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnxruntime)")
pytest.importorskip("onnxscript", reason="needs the onnx extra (onnxscript)")
onnx = pytest.importorskip("onnx", reason="needs the onnx extra (onnx)")

from tiny_models import model_dir as make_model_dir

from slmkit.export.onnx import MODEL_DIR_FILES, export_onnx, quantize_onnx
from slmkit.generation.ort import load_onnx

PROMPTS = ["The quick brown", "def add(a, b):\n", "User: hello"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("onnx") / "model")


@pytest.fixture(scope="module")
def onnx_dir(model_dir) -> Path:
    out = model_dir.parent / "export"
    assert main(["export", "onnx", str(model_dir), "--out", str(out), "-q"]) == 0
    return out


def quantized_dir(onnx_dir: Path, method: str) -> Path:
    out = onnx_dir.parent / f"export-{method}"
    if not out.exists():
        out.mkdir()
        for name in MODEL_DIR_FILES:
            shutil.copy2(onnx_dir / name, out / name)
        quantize_onnx(onnx_dir / "model.onnx", out / "model.onnx", method)
    return out


def test_export_directory_is_self_contained(onnx_dir):
    assert {"model.onnx", "config.json", "tokenizer.json", "generation.json", "export.json"} <= {p.name for p in onnx_dir.iterdir()}
    info = json.loads((onnx_dir / "export.json").read_text())
    assert info["max_abs_difference_fp32"] <= 1e-4
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]


def test_logits_match_pytorch_for_padded_prefill_and_decode(model_dir, onnx_dir):
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(onnx_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    cache, ort_cache = model.new_cache(len(prompts)), ort_model.new_cache(len(prompts))
    with torch.inference_mode():
        for step in range(4):  # prefill, then three decode steps of one token
            expected = model(ids, attention_mask=mask, cache=cache)
            got = ort_model(ids, attention_mask=mask, cache=ort_cache)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-4, step
            ids = expected[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
    assert ort_cache.length == cache.length == width + 3


def test_greedy_sampled_and_beam_outputs_are_identical(model_dir, onnx_dir):
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(onnx_dir)
    assert slmkit.generate(ort_model, tokenizer, PROMPTS, 30) == slmkit.generate(model, tokenizer, PROMPTS, 30)
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 3}
    assert slmkit.generate(ort_model, tokenizer, PROMPTS[0], 30, **sampled) == slmkit.generate(model, tokenizer, PROMPTS[0], 30, **sampled)
    beams = [slmkit.generate(m, tokenizer, PROMPTS[1], 20, num_beams=3) for m in (model, ort_model)]
    assert beams[0] == beams[1]


def test_cli_onnx_backend_prints_the_same_text(model_dir, onnx_dir, capsys):
    assert main(["generate", str(model_dir), "The quick", "--max-new-tokens", "25"]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "25", "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == expected
    optimized = onnx_dir.parent / "optimized.onnx"
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "25", "--backend", "onnx",
                 "--ort-opt-level", "basic", "--save-optimized", str(optimized)]) == 0
    assert capsys.readouterr().out == expected and optimized.stat().st_size > 0


def test_profile_writes_a_trace_and_prints_top_operators(onnx_dir, capsys):
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "5", "--backend", "onnx", "--profile"]) == 0
    err = capsys.readouterr().err
    trace = Path(err.split("ONNX Runtime trace: ")[1].splitlines()[0])
    events = json.loads(trace.read_text())
    assert any(e.get("cat") == "Node" for e in events)
    table = err.split("top operators by time:\n")[1].splitlines()
    assert 1 <= len(table) <= 10 and any(line.split()[0] == "MatMul" for line in table)


@pytest.mark.parametrize("method, kernels", [("int8", {"DynamicQuantizeMatMul", "MatMulInteger"}), ("int4", {"MatMulNBits"})])
def test_quantized_exports_run_and_stay_close(model_dir, onnx_dir, method, kernels):
    out = quantized_dir(onnx_dir, method)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert sum(op in kernels for op in ops) >= 7 * 2  # q, k, v, o, gate, up, down of both layers
    assert (out / "model.onnx").stat().st_size < (onnx_dir / "model.onnx").stat().st_size
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(out)
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.inference_mode():
        expected, got = model(ids), ort_model(ids)
    # close: the same top token at almost every position, and a small logit error
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (got - expected).abs().max() < 0.1 * (expected.max() - expected.min())
    greedy = slmkit.generate(ort_model, tokenizer, "The quick", 20)
    assert len(greedy) > 0


def test_encoders_and_missing_directories_are_refused(tmp_path):
    from tiny_models import model_dir as build

    encoder = build(tmp_path / "enc", steps=0, causal=False)
    with pytest.raises(InputError, match="causal"):
        export_onnx(encoder, tmp_path / "out")
    with pytest.raises(InputError, match="not a model directory"):
        export_onnx(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="no model.onnx"):
        load_onnx(encoder)


def test_torch_backend_refuses_onnx_runtime_options(model_dir, capsys):
    assert main(["generate", str(model_dir), "hi", "--profile"]) == 2
    assert "--backend onnx" in capsys.readouterr().err


@pytest.mark.slow
def test_export_that_does_not_reproduce_the_model_fails_and_writes_nothing(model_dir, tmp_path):
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(model_dir, tmp_path / "out", tolerance=1e-12)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_export_with_int4_quantization_end_to_end(model_dir, tmp_path):
    out = export_onnx(model_dir, tmp_path / "int4", quantize="int4")
    info = json.loads((out / "export.json").read_text())
    assert info["quantize"] == "int4" and info["max_abs_difference_fp32"] <= 1e-4
    assert not list(out.glob("model.fp32*"))
    ort_model, tokenizer = load_onnx(out)
    assert slmkit.generate(ort_model, tokenizer, "The quick", 10)
