"""ONNX export, both graph kinds (fused for llama-style models, traced for the rest): logits within
1e-4 of PyTorch, identical greedy / sampled / beam output through ONNX Runtime, ORT quantization,
the CLI. One export per graph kind (the traced one takes tens of seconds), shared by the tests."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import ExportError, InputError, OutputExistsError

pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnxruntime)")
pytest.importorskip("onnxscript", reason="needs the onnx extra (onnxscript)")
onnx = pytest.importorskip("onnx", reason="needs the onnx extra (onnx)")

from tiny_models import model_dir as make_model_dir

from slmkit.export.onnx import MODEL_DIR_FILES, export_onnx, quantize_onnx
from slmkit.export.onnx_fused import unsupported_reason
from slmkit.generation.ort import load_onnx

PROMPTS = ["The quick brown", "def add(a, b):\n", "User: hello"]
# a llama-style model gets the fused graph; a GPT-2-style one (layernorm, learned positions, gelu, biases) the traced one
CONFIGS = {"fused": {}, "traced": {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "attn_bias": True, "mlp_bias": True}}
QUANTIZED_MATMULS = {"fused": 5 * 2, "traced": 6 * 2}  # per layer: qkv, o, gate, up, down | q, k, v, o, up, down


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A llama-style model directory."""
    return make_model_dir(tmp_path_factory.mktemp("onnx") / "model")


def export_with_cli(model_dir: Path, out: Path) -> Path:
    assert main(["export", "onnx", str(model_dir), "--out", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def fused_dir(model_dir) -> Path:
    return export_with_cli(model_dir, model_dir.parent / "export")


@pytest.fixture(scope="module", params=list(CONFIGS))
def export(request, tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, its `slmkit export onnx` directory) for each graph kind."""
    if request.param == "fused":
        model_dir, out = request.getfixturevalue("model_dir"), request.getfixturevalue("fused_dir")
    else:
        root = tmp_path_factory.mktemp(f"onnx-{request.param}")
        model_dir = make_model_dir(root / "model", **CONFIGS[request.param])
        out = export_with_cli(model_dir, root / "export")
    assert json.loads((out / "export.json").read_text())["graph"] == request.param
    return model_dir, out


def quantized_dir(onnx_dir: Path, method: str) -> Path:
    out = onnx_dir.parent / f"export-{method}"
    if not out.exists():
        out.mkdir()
        for name in MODEL_DIR_FILES:
            shutil.copy2(onnx_dir / name, out / name)
        quantize_onnx(onnx_dir / "model.onnx", out / "model.onnx", method)
    return out


def test_export_directory_is_self_contained(export):
    _, onnx_dir = export
    assert {"model.onnx", "config.json", "tokenizer.json", "generation.json", "export.json"} <= {p.name for p in onnx_dir.iterdir()}
    info = json.loads((onnx_dir / "export.json").read_text())
    assert info["max_abs_difference_fp32"] <= 1e-4
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert [i.name for i in graph.input] == info["inputs"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    cache = "max_sequence_length" if info["graph"] == "fused" else "past_sequence_length"
    assert inputs["past_key_values.1.value"] == ["batch_size", 2, cache, 16]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]


def test_auto_picks_the_fused_graph_for_llama_style_models_and_says_why_not_otherwise(export):
    _, onnx_dir = export
    info = json.loads((onnx_dir / "export.json").read_text())
    ops = Counter(n.op_type for n in onnx.load(str(onnx_dir / "model.onnx")).graph.node)
    if info["graph"] == "fused":
        assert "traced_because" not in info
        assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 2 * 2
        assert not {"CumSum", "Concat", "Softmax", "Cos", "Sin"} & set(ops)  # nothing recomputed or copied per step
        assert sum(ops.values()) <= 11 * 2 + 4  # 11 per layer; embedding gather + transpose, first norm, lm_head
    else:
        assert info["traced_because"] == "norm is not rmsnorm; mlp is not swiglu; pos is not rope over the whole head; the model has biases"
        assert "GroupQueryAttention" not in ops


def test_logits_match_pytorch_for_padded_prefill_chunk_and_decode(export):
    model_dir, onnx_dir = export
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(onnx_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
    cache, ort_cache = model.new_cache(len(prompts)), ort_model.new_cache(len(prompts))
    fed = width
    with torch.inference_mode():
        for step in range(4):  # left-padded prefill, a chunk of two tokens, then two decode steps of one
            expected = model(ids, attention_mask=mask, cache=cache)
            got = ort_model(ids, attention_mask=mask, cache=ort_cache)
            assert got.shape == expected.shape
            real = mask[:, -ids.shape[1]:].bool()  # logits at padding positions mean nothing
            assert (got - expected).abs()[real].max().item() <= 1e-4, step
            ids = expected[:, -1].argmax(-1, keepdim=True).repeat(1, 2 if step == 0 else 1)
            fed += ids.shape[1]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert ort_cache.length == cache.length == fed - ids.shape[1]


def test_greedy_sampled_and_beam_outputs_are_identical(export):
    model_dir, onnx_dir = export
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(onnx_dir)
    assert slmkit.generate(ort_model, tokenizer, PROMPTS, 30) == slmkit.generate(model, tokenizer, PROMPTS, 30)
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 3}
    assert slmkit.generate(ort_model, tokenizer, PROMPTS[0], 30, **sampled) == slmkit.generate(model, tokenizer, PROMPTS[0], 30, **sampled)
    beams = [slmkit.generate(m, tokenizer, PROMPTS[1], 20, num_beams=3) for m in (model, ort_model)]
    assert beams[0] == beams[1]


def test_cli_onnx_backend_prints_the_same_text(export, capsys):
    model_dir, onnx_dir = export
    assert main(["generate", str(model_dir), "The quick", "--max-new-tokens", "25"]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "25", "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == expected
    optimized = onnx_dir.parent / "optimized.onnx"
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "25", "--backend", "onnx",
                 "--ort-opt-level", "basic", "--save-optimized", str(optimized)]) == 0
    assert capsys.readouterr().out == expected and optimized.stat().st_size > 0


def test_profile_writes_a_trace_and_prints_top_operators(export, capsys):
    _, onnx_dir = export
    assert main(["generate", str(onnx_dir), "The quick", "--max-new-tokens", "5", "--backend", "onnx", "--profile"]) == 0
    err = capsys.readouterr().err
    trace = Path(err.split("ONNX Runtime trace: ")[1].splitlines()[0])
    events = json.loads(trace.read_text())
    assert any(e.get("cat") == "Node" for e in events)
    table = err.split("top operators by time:\n")[1].splitlines()
    ops = {line.split()[0] for line in table}
    assert 1 <= len(table) <= 10 and "MatMul" in ops
    if json.loads((onnx_dir / "export.json").read_text())["graph"] == "fused":
        assert "GroupQueryAttention" in ops


@pytest.mark.parametrize("method, kernels", [("int8", {"DynamicQuantizeMatMul", "MatMulInteger"}), ("int4", {"MatMulNBits"})])
def test_quantized_exports_run_and_stay_close(export, method, kernels):
    model_dir, onnx_dir = export
    out = quantized_dir(onnx_dir, method)
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    kind = json.loads((onnx_dir / "export.json").read_text())["graph"]
    assert sum(op in kernels for op in ops) >= QUANTIZED_MATMULS[kind]
    assert (out / "model.onnx").stat().st_size < (onnx_dir / "model.onnx").stat().st_size
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(out)
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.inference_mode():
        expected, got = model(ids), ort_model(ids)
    # close: the same top token at almost every position, and a small logit error
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert (got - expected).abs().max() < 0.1 * (expected.max() - expected.min())
    greedy = slmkit.generate(ort_model, tokenizer, ["The quick", "User: hello"], 20)
    assert len(greedy) == 2 and all(greedy)


def test_fused_graph_refuses_what_it_cannot_express(tmp_path):
    from tiny_models import model_dir as build

    gpt2_style = build(tmp_path / "gpt2", steps=0, **CONFIGS["traced"])
    with pytest.raises(InputError, match="fused ONNX graph cannot express this model .*norm is not rmsnorm"):
        export_onnx(gpt2_style, tmp_path / "out", graph="fused")
    assert not (tmp_path / "out").exists()
    assert unsupported_reason(ModelConfig(qk_norm=True, attn_softcap=50.0)) == "qk_norm is on; a soft-cap is set"
    assert unsupported_reason(ModelConfig.from_preset("llama-1b")) is None


def test_fused_graph_of_an_untied_mqa_model_with_scaled_rope_and_attention_scale(tmp_path):
    """The fused graph's other branches: its own embedding table, one kv head, Llama-3 rope scaling, attn_scale."""
    from tiny_models import model_dir as build

    rope_scaling = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}
    model_dir = build(tmp_path / "model", steps=20, tie_embeddings=False, n_kv_heads=1, rope_scaling=rope_scaling, attn_scale=0.3)
    out = export_onnx(model_dir, tmp_path / "out")
    info = json.loads((out / "export.json").read_text())
    assert info["graph"] == "fused" and info["max_abs_difference_fp32"] <= 1e-4
    model, tokenizer = slmkit.load(model_dir)
    ort_model, _ = load_onnx(out)
    assert slmkit.generate(ort_model, tokenizer, PROMPTS, 40) == slmkit.generate(model, tokenizer, PROMPTS, 40)


def test_fused_cache_refuses_overflow_and_masks_with_holes(fused_dir):
    ort_model, _ = load_onnx(fused_dir)
    cache = ort_model.new_cache(1, max_len=4)
    ort_model(torch.tensor([[5, 6, 7]]), cache=cache)
    with pytest.raises(InputError, match="the cache holds 4 tokens; 5 do not fit"):
        ort_model(torch.tensor([[8, 9]]), cache=cache)
    with pytest.raises(InputError, match="left-padded attention masks"):
        ort_model(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 0, 1]]))


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


def test_export_that_does_not_reproduce_the_model_fails_and_writes_nothing(model_dir, tmp_path, capsys):
    with pytest.raises(ExportError, match="differ from PyTorch"):
        export_onnx(model_dir, tmp_path / "out", tolerance=1e-12)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert main(["export", "onnx", str(model_dir), "--out", str(tmp_path / "out"), "--tolerance", "1e-12", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX Runtime logits differ from PyTorch by ") and "--tolerance 1e-12 of the largest |logit|" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_bound_scales_with_the_logits_and_options_are_checked_before_loading(tmp_path):
    """Logits of magnitude ~40 (a real model's) carry float32 rounding above an absolute 1e-4."""
    from safetensors.torch import load_file, save_file

    model_dir = make_model_dir(tmp_path / "model", steps=0)
    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    state["embed_tokens.weight"] = state["embed_tokens.weight"] * 60  # tied: large embeddings and large logits
    save_file(state, weights)
    info = json.loads((export_onnx(model_dir, tmp_path / "out") / "export.json").read_text())
    assert info["max_abs_logit"] > 30 and info["tolerance"] == 1e-4
    assert info["max_abs_difference_fp32"] <= 1e-4 * info["max_abs_logit"]
    with pytest.raises(OutputExistsError, match="already exists"):  # before reading the (missing) model
        export_onnx(tmp_path / "no-model", tmp_path / "out")
    with pytest.raises(InputError, match="--tolerance must be > 0"):
        export_onnx(model_dir, tmp_path / "other", tolerance=0)


def test_export_with_int4_quantization_end_to_end(model_dir, tmp_path):
    out = export_onnx(model_dir, tmp_path / "int4", quantize="int4")
    info = json.loads((out / "export.json").read_text())
    assert info["quantize"] == "int4" and info["graph"] == "fused" and info["max_abs_difference_fp32"] <= 1e-4
    assert info["max_abs_difference_quantized"] < 1.0
    assert not list(out.glob("model.fp32*"))
    ort_model, tokenizer = load_onnx(out)
    assert slmkit.generate(ort_model, tokenizer, "The quick", 10)
