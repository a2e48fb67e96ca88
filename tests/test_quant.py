"""Quantization: exact int4 packing, round-to-nearest error bounds, GPTQ beating RTN, the SmoothQuant
transform, exact reload of quantized model directories, the quality budget and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import InputError, QualityBudgetError
from slmkit.eval.perplexity import perplexity_of_texts
from slmkit.model import Transformer
from slmkit.model.io import load, load_model, save_model_dir
from slmkit.quant import quantize, quantize_model
from slmkit.quant.calibration import calibration_windows
from slmkit.quant import fp8
from slmkit.quant.gptq import gptq_quantize
from slmkit.quant.linear import QuantizedLinear, W8A8Linear
from slmkit.quant.quantize_dir import held_out_texts
from slmkit.quant.rtn import dequantize, pack_int4, quantize_rtn, unpack_int4
from slmkit.quant.smoothquant import activation_maxima, smooth
from slmkit.quant.targets import BLOCKS, linear_targets
from slmkit.tokenizer import train_bpe

WORDS = {"noun": ["cat", "dog", "bird", "fish", "horse", "mouse", "tree", "river", "stone", "cloud"],
         "verb": ["sees", "likes", "follows", "finds", "carries", "pushes", "watches"],
         "adj": ["small", "big", "red", "quick", "lazy", "old", "green"]}


def sentences(n: int, seed: int) -> str:
    rng = random.Random(seed)
    pick = lambda kind: rng.choice(WORDS[kind])
    return " ".join(f"the {pick('adj')} {pick('noun')} {pick('verb')} the {pick('noun')} near {rng.randint(1, 9)} "
                    f"{pick('noun')}s." for _ in range(n))


TRAIN_TEXT, HELD_OUT_TEXT = sentences(1500, 0), sentences(150, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny Llama-style model trained for a few seconds on a toy language, as a model directory."""
    tokenizer = train_bpe([TRAIN_TEXT], 320)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, ffn_hidden=192)
    model = Transformer(cfg)
    ids = torch.tensor(tokenizer.encode_ordinary(TRAIN_TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 65] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("model") / "fp32"
    save_model_dir(model.eval(), directory, tokenizer)
    (directory.parent / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    (directory.parent / "held_out.txt").write_text(HELD_OUT_TEXT, encoding="utf-8")
    return directory


def calib_ids(model_dir: Path, samples: int = 32) -> torch.Tensor:
    _, tokenizer = load(model_dir)
    return calibration_windows(tokenizer, [model_dir.parent / "train.txt"], samples, 64)


def held_out_ppl(model: Transformer, model_dir: Path) -> float:
    _, tokenizer = load(model_dir)
    return perplexity_of_texts(model, tokenizer, [HELD_OUT_TEXT]).perplexity


# ---------------------------------------------------------------------------- tensors
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.randoms(use_true_random=False))
def test_int4_pack_unpack_is_exact(rows, half_cols, rng):
    codes = torch.tensor([[rng.randint(-8, 7) for _ in range(2 * half_cols)] for _ in range(rows)], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_packing_layout():
    packed = pack_int4(torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8))
    assert packed.tolist() == [[0x00 | (15 << 4), 8 | (7 << 4)]]  # even column low nibble, offset 8


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, 64])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.rand(24, 1) + (0 if symmetric else 0.5)
    codes, scales, zeros = quantize_rtn(w, bits, group_size, symmetric)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and lo <= codes.min() and codes.max() <= hi
    step = scales.repeat_interleave(group_size, dim=1)
    error = (dequantize(codes, scales, None if symmetric else zeros) - w).abs()
    assert (error <= step / 2 + 1e-6).all()
    if symmetric:
        assert torch.all(zeros == 0)
        # the largest weight of each group lands exactly on the last code
        amax = w.reshape(24, -1, group_size).abs().amax(-1)
        assert torch.allclose(scales * hi, amax)


def test_fp8_keeps_three_mantissa_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    for group_size in (None, 16):
        q, scales = fp8.quantize(w, fp8.E4M3, None if group_size is None else (1, group_size))
        assert q.dtype == torch.float8_e4m3fn and q.float().abs().max() == 448
        scale = scales.expand(32, -1).repeat_interleave(64 // scales.shape[1], dim=1)
        normal = w.abs() / scale >= 2 ** -6  # e4m3 normal numbers: relative rounding error <= 2^-4
        error = (dequantize(q, scales, None) - w).abs()
        assert (error <= w.abs() * 2 ** -4)[normal].all() and normal.float().mean() > 0.9


@pytest.mark.parametrize("bits, group_size, symmetric, permuted", [
    (8, 64, True, False), (8, 64, False, False), (4, 16, True, False), (4, 32, False, True), (8, 16, True, True)])
def test_quantized_linear_computes_with_its_dequantized_weight(bits, group_size, symmetric, permuted):
    torch.manual_seed(0)
    codes, scales, zeros = quantize_rtn(torch.randn(24, 64), bits, group_size, symmetric)
    perm = torch.randperm(64) if permuted else None
    layer = QuantizedLinear(64, 24, True, bits, group_size, symmetric, permuted)
    layer.set_weights(codes, scales, None if symmetric else zeros.to(torch.int8), perm, torch.randn(24))
    weight = dequantize(codes, scales, None if symmetric else zeros)
    if permuted:  # codes were in permuted column order: column perm[j] of the model holds column j
        weight = torch.empty_like(weight).index_copy_(1, perm, weight)
    assert torch.equal(layer.dequantized_weight(), weight)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_w8a8_linear_is_integer_arithmetic():
    torch.manual_seed(0)
    w, x = torch.randn(16, 96), torch.randn(4, 96) * 3
    codes, scales, _ = quantize_rtn(w, 8, 96)
    layer = W8A8Linear(96, 16, False).set_weights(codes, scales[:, 0])
    x_scale = x.abs().amax(-1, keepdim=True) / 127
    x_codes = torch.round(x / x_scale).clamp(-127, 127).to(torch.int64)
    exact = (x_codes @ codes.to(torch.int64).T).double() * x_scale.double() * scales[:, 0].double()
    torch.testing.assert_close(layer(x).double(), exact, rtol=1e-6, atol=1e-6)
    assert (layer(x) - x @ w.T).abs().max() < 0.05 * (x @ w.T).abs().max()


# ---------------------------------------------------------------------------- GPTQ
def test_gptq_beats_round_to_nearest_on_one_layer():
    torch.manual_seed(0)
    mixing = torch.randn(64, 64) / 8 + torch.eye(64)  # correlated inputs, as in real activations
    x = (torch.randn(2048, 64) * torch.linspace(0.2, 3, 64)) @ mixing
    w = torch.randn(32, 64)
    H = 2 * x.T @ x / len(x)
    rtn = dequantize(*quantize_rtn(w, 4, 16))
    rtn_error = (x @ (rtn - w).T).pow(2).mean()
    for act_order in (False, True):
        codes, scales, _, perm = gptq_quantize(w, H, 4, 16, act_order=act_order)
        q = dequantize(codes, scales, None)
        if act_order:
            q = torch.empty_like(q).index_copy_(1, perm, q)
        gptq_error = (x @ (q - w).T).pow(2).mean()
        assert gptq_error < 0.7 * rtn_error, (act_order, gptq_error, rtn_error)


def test_gptq_beats_round_to_nearest_on_a_trained_model(trained):
    reference = load_model(trained)
    windows = calib_ids(trained)
    x = windows[:8]
    with torch.no_grad():
        ref_logits = reference(x)
    results = {}
    for method in ("int4", "gptq"):
        model = load_model(trained)
        quantize_model(model, method, group_size=32, calib_ids=windows)
        with torch.no_grad():
            error = (model(x) - ref_logits).pow(2).mean().item()
        results[method] = (error, held_out_ppl(model, trained))
    assert results["gptq"][0] < results["int4"][0]
    assert results["gptq"][1] < results["int4"][1]


# ---------------------------------------------------------------------------- SmoothQuant
def test_smoothing_alone_leaves_the_model_function_unchanged(trained):
    model = load_model(trained)
    x = calib_ids(trained, 4)
    with torch.no_grad():
        before = model(x)
    unfolded = smooth(model, activation_maxima(model, x), alpha=0.5)
    assert sorted(n.rsplit(".", 1)[1] for n in unfolded) == ["down_proj", "down_proj", "o_proj", "o_proj"]
    for name, s in unfolded.items():  # what W8A8Linear does with `smooth` before quantizing its input
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, s=s: (args[0] / s,))
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert (model.layers[0].input_layernorm.weight - 1).abs().max() > 0.01  # the norms did change


def test_smoothquant_beats_plain_w8a8_when_activations_have_outliers(trained):
    windows = calib_ids(trained, 8)
    errors = {}
    for alpha in (0.0, 0.5):  # alpha 0 migrates nothing from the activations: plain W8A8
        model = load_model(trained)
        model.layers[0].input_layernorm.weight.data[3] *= 30  # one outlier channel, compensated in q/k/v
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(model.layers[0].self_attn, name).weight.data[:, 3] /= 30
        with torch.no_grad():
            reference = model(windows)
        quantize_model(model, "smoothquant", calib_ids=windows, alpha=alpha)
        with torch.no_grad():
            errors[alpha] = (model(windows) - reference).pow(2).mean().item()
    assert errors[0.5] < errors[0.0]


# ---------------------------------------------------------------------------- model directories
@pytest.mark.parametrize("method, options", [
    ("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 0, "symmetric": False}),
    ("gptq", {"group_size": 32, "act_order": True}), ("smoothquant", {}), ("fp8", {}), ("fp8", {"group_size": 32})])
def test_quantized_directory_reloads_to_identical_logits(trained, tmp_path, method, options):
    model, tokenizer = load(trained)
    section = quantize_model(model, method, calib_ids=calib_ids(trained, 8), **options)
    save_model_dir(model, tmp_path / "q", tokenizer, quantization=section)
    reloaded, tokenizer = load(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["method"] == method and len(config["quantization"]["modules"]) == 14
    assert type(reloaded.layers[1].mlp.down_proj) is type(model.layers[1].mlp.down_proj) is not torch.nn.Linear
    assert type(reloaded.lm_head) is torch.nn.Linear and reloaded.lm_head.weight is reloaded.embed_tokens.weight
    x = calib_ids(trained, 2)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        stored = f.get_tensor("layers.0.self_attn.q_proj.qweight")
    expected = {"int4": torch.uint8, "fp8": torch.float8_e4m3fn}.get(method if method != "gptq" else "int4", torch.int8)
    assert stored.dtype == expected
    assert stored.shape == ((64, 32) if expected == torch.uint8 else (64, 64))
    import slmkit
    assert isinstance(slmkit.generate(reloaded, tokenizer, "the small cat", max_new_tokens=5), str)


@pytest.mark.parametrize("method", ["gptq", "smoothquant"])
def test_calibrated_methods_quantize_every_linear_of_a_model_laid_out_for_decoding(trained, method):
    """Generation packs q/k/v and gate/up into one matmul, which calibration hooks never see: a
    model that has generated (as `quantize` measures its decode speed first) still gets all 14."""
    import slmkit

    model, tokenizer = load(trained)
    slmkit.generate(model, tokenizer, "the small cat", max_new_tokens=3)
    section = quantize_model(model, method, calib_ids=calib_ids(trained, 8))
    assert len(section["modules"]) == 14
    assert not any(type(m) is torch.nn.Linear for name, m in model.named_modules() if name.startswith("layers."))


def test_targets_are_the_block_linears_only(trained):
    names = linear_targets(load_model(trained), include=BLOCKS)
    assert len(names) == 14 and all(n.startswith("layers.") for n in names)


# ---------------------------------------------------------------------------- the job and its report
def test_quantize_writes_a_directory_with_its_quality_report(trained, tmp_path):
    out = tmp_path / "int8"
    report = quantize(trained, "int8", out, eval_paths=[trained.parent / "held_out.txt"])
    data = json.loads((out / "quant_report.json").read_text())
    assert data["size_after"] == (out / "model.safetensors").stat().st_size < data["size_before"]
    assert abs(data["ppl_increase_pct"]) < 1 and data["perplexity_before"] == pytest.approx(held_out_ppl(load_model(trained), trained))
    assert data["tokens_per_s_before"] > 0 and data["tokens_per_s_after"] > 0
    assert report.perplexity_after == data["perplexity_after"]
    assert "| perplexity (held-out) |" in (out / "quant_report.md").read_text()
    assert (out / "tokenizer.json").is_file() and (out / "generation.json").is_file()


def test_the_report_scores_a_bounded_budget_in_short_windows(trained, tmp_path, capsys):
    out, held_out = tmp_path / "int8", trained.parent / "held_out.txt"
    assert main(["quantize", str(trained), "--method", "int8", "--eval", str(held_out), "--eval-tokens", "300",
                 "--eval-context", "16", "--out", str(out), "-q"]) == 0
    data = json.loads((out / "quant_report.json").read_text())
    model, tokenizer = load(trained)
    texts = held_out_texts(tokenizer, [held_out], 300)
    expected = perplexity_of_texts(model, tokenizer, texts, context=16)
    assert (data["eval_context"], data["eval_tokens"]) == (16, expected.tokens)
    assert data["perplexity_before"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert "in windows of 16 tokens" in capsys.readouterr().out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_over_budget_result_is_refused_and_nothing_written(trained, tmp_path):
    out = tmp_path / "int4"
    with pytest.raises(QualityBudgetError, match=r"raises perplexity by .*over the budget of 0.0%; nothing written"):
        quantize(trained, "int4", out, group_size=0, eval_paths=[trained.parent / "held_out.txt"], max_ppl_increase=0.0)
    assert not out.exists() and leftovers(tmp_path) == []
    held_out = str(trained.parent / "held_out.txt")
    assert main(["quantize", str(trained), "--method", "int4", "--group-size", "0", "--eval", held_out,
                 "--max-ppl-increase", "0", "--out", str(out), "-q"]) == 2
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_quantizes_and_the_result_generates(trained, tmp_path, capsys):
    out = tmp_path / "gptq"
    train = str(trained.parent / "train.txt")
    assert main(["quantize", str(trained), "--method", "gptq", "--group-size", "32", "--calib", train,
                 "--calib-samples", "8", "--eval", str(trained.parent / "held_out.txt"), "--out", str(out), "-q"]) == 0
    assert "Quantization report: gptq" in capsys.readouterr().out
    assert main(["generate", str(out), "the small cat", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["inspect", str(out)]) == 0  # the architecture of a quantized directory is still readable


@pytest.mark.parametrize("args, message", [
    (["--method", "int4", "--group-size", "48", "--eval", "TRAIN"],
     "group size 48 does not divide the input dimension 64 of layers.0.self_attn.q_proj (weight 64x64); choose a divisor such as 64 or 32"),
    (["--method", "gptq"], "gptq needs calibration text: pass --calib FILES"),
    (["--method", "smoothquant", "--calib", "EMPTY"], "calibration data: no documents found in "),
    (["--method", "smoothquant", "--calib", "BLANK"], "calibration data is empty: "),
    (["--method", "int8"], "the quality report needs held-out text: pass --eval FILES"),
    (["--method", "smoothquant", "--group-size", "32", "--calib", "TRAIN"], "smoothquant uses per-channel int8 weights"),
    (["--method", "int8", "--eval", "TRAIN", "--out", "MODEL"], "already exists; pass --force to overwrite it"),
])
def test_cli_errors_are_one_line(trained, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "blank.txt").write_text("x")  # one token: nothing to predict
    names = {"EMPTY": str(empty), "BLANK": str(tmp_path / "blank.txt"), "TRAIN": str(trained.parent / "train.txt"), "MODEL": str(trained)}
    args = [names.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(["quantize", str(trained), *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unknown_method_is_refused(trained, tmp_path):
    with pytest.raises(InputError, match="unknown quantization method 'int3'; choose one of int8, int4, gptq, smoothquant, fp8"):
        quantize(trained, "int3", tmp_path / "out", eval_paths=[trained.parent / "held_out.txt"])
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(trained), "--method", "int3", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------- default group sizes
def test_default_group_size_fits_each_layer_of_the_tiny_preset(tmp_path):
    cfg = ModelConfig.from_preset("tiny", vocab_size=320, n_layers=2)  # FFN width 704 = 64 * 11
    model = Transformer(cfg)
    section = quantize_model(model, "int4")
    down = [f"layers.{i}.mlp.down_proj" for i in range(2)]
    assert section["group_size"] == 128 and section["group_sizes"] == {name: 64 for name in down}
    assert model.layers[0].mlp.down_proj.group_size == 64 and model.layers[0].mlp.up_proj.group_size == 128
    tokenizer = train_bpe([TRAIN_TEXT], 320)
    save_model_dir(model, tmp_path / "q", tokenizer, quantization=section)
    reloaded = load_model(tmp_path / "q")
    assert reloaded.layers[1].mlp.down_proj.scales.shape == (256, 704 // 64)
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_default_group_size_of_a_576_wide_model():
    cfg = ModelConfig(vocab_size=64, context_length=32, d_model=576, n_layers=1, n_heads=9, n_kv_heads=3, ffn_hidden=1536)
    section = quantize_model(Transformer(cfg), "int4")  # SmolLM2's width: 576 = 64 * 9; its FFN 1536 = 128 * 12
    assert section["group_size"] == 64 and section["group_sizes"] == {"layers.0.mlp.down_proj": 128}


def test_a_given_group_size_that_does_not_divide_names_the_layer():
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=320, n_layers=1))
    with pytest.raises(InputError, match=r"^group size 128 does not divide the input dimension 704 of "
                                         r"layers\.0\.mlp\.down_proj \(weight 256x704\); choose a divisor such as 64 or 32$"):
        quantize_model(model, "int4", group_size=128)


def test_cli_reports_the_group_sizes_it_chose(tmp_path, capsys):
    tokenizer = train_bpe([TRAIN_TEXT], 320)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, n_layers=2, context_length=64))
    save_model_dir(model, tmp_path / "tiny", tokenizer)
    (tmp_path / "held_out.txt").write_text(HELD_OUT_TEXT[:2000])
    out = tmp_path / "int4"
    assert main(["quantize", str(tmp_path / "tiny"), "--method", "int4", "--eval", str(tmp_path / "held_out.txt"),
                 "--eval-tokens", "256", "--out", str(out), "--device", "cpu", "-q"]) == 0
    chosen = "per layer: 128 for input width 256 (12 layers), 64 for input width 704 (2 layers)"
    printed = capsys.readouterr().out
    assert f"group_size={chosen}" in printed and "(cpu, float32)" in printed
    assert json.loads((out / "quant_report.json").read_text())["settings"]["group_size"] == chosen
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["group_size"] == 128 and config["group_sizes"] == {"layers.0.mlp.down_proj": 64, "layers.1.mlp.down_proj": 64}
