"""--device and --dtype: one resolution for every command that runs a model, a one-line error for a
device this machine lacks, and models that load and generate in bfloat16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import model_dir as make_model_dir

import slmkit
from slmkit.cli import main
from slmkit.devices import resolve, resolve_device, resolve_dtype
from slmkit.errors import DeviceError
from slmkit.model.classifier import SequenceClassifier, save_classifier
from slmkit.model.io import load_model, save_model_dir
from slmkit.quant.linear import FP8Linear, QuantizedLinear
from slmkit.quant.methods import quantize_model

# every command that loads a model, with the arguments it needs besides the model directory
COMMANDS = {
    "generate": ["generate", "MODEL", "hello"],
    "chat": ["chat", "MODEL"],
    "eval perplexity": ["eval", "perplexity", "MODEL", "TEXT"],
    "eval generate": ["eval", "generate", "MODEL", "--data", "RECORDS", "--template", "alpaca", "--out", "OUT"],
    "quantize": ["quantize", "MODEL", "--method", "int8", "--eval", "TEXT", "--out", "OUT"],
    "serve": ["serve", "MODEL"],
    "classify": ["classify", "CLASSIFIER", "hello"],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("devices")
    model = make_model_dir(root / "model", steps=20)
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    (root / "records.jsonl").write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    backbone, tokenizer = slmkit.load(model)
    torch.manual_seed(0)
    save_classifier(SequenceClassifier(backbone, ["no", "yes"]), root / "classifier", tokenizer)
    return {"MODEL": str(model), "TEXT": str(root / "text.txt"), "RECORDS": str(root / "records.jsonl"),
            "OUT": str(root / "out"), "CLASSIFIER": str(root / "classifier")}


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# ---------------------------------------------------------------------------- resolution
def test_auto_is_cuda_then_mps_then_cpu_and_its_dtype_follows(monkeypatch, no_gpu):
    assert resolve("auto", "auto") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve("auto", "auto") == (torch.device("mps"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(DeviceError, match="^this GPU does not support bfloat16; use --dtype float16 or float32$"):
        resolve_dtype("bfloat16", torch.device("cuda"))


def test_names_and_aliases(no_gpu):
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == resolve_device(None) == torch.device("cpu")
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                        (torch.bfloat16, torch.bfloat16)):
        assert resolve_dtype(name, torch.device("cpu")) == dtype
    with pytest.raises(DeviceError, match=r"^unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps$"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match=r"^unknown dtype 'int8'; use auto, float32, bfloat16 or float16$"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="^MPS is not available on this machine; use --device cpu$"):
        resolve_device("mps")


# ---------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_lists_device_and_dtype(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "--device DEVICE" in out and "--dtype {auto,float32,bfloat16,float16}" in out
    assert "auto (CUDA, then MPS, then CPU)" in " ".join(out.split())


def test_finetune_commands_take_device(capsys):
    for task in ("classify", "sft", "dpo", "distill"):
        with pytest.raises(SystemExit):
            main(["finetune", task, "--help"])
        assert "--device DEVICE" in capsys.readouterr().out


@pytest.mark.parametrize("command", [*COMMANDS, "finetune sft"])
def test_cuda_on_a_machine_without_it_is_one_line_and_exit_2(dirs, capsys, no_gpu, command):
    argv = COMMANDS.get(command) or ["finetune", "sft", "MODEL", "--data", "RECORDS", "--out", "OUT"]
    assert main([dirs.get(a, a) for a in argv] + ["--device", "cuda", "-q"]) == 2
    assert capsys.readouterr().err == "error: CUDA is not available on this machine; use --device cpu\n"
    assert not Path(dirs["OUT"]).exists()


def test_commands_run_on_cpu_in_bfloat16(dirs, capsys):
    assert main(["generate", dirs["MODEL"], "The quick", "--max-new-tokens", "4", "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "perplexity", dirs["MODEL"], dirs["TEXT"], "--json", "--device", "cpu", "--dtype", "bfloat16", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert main(["classify", dirs["CLASSIFIER"], "hello", "--json", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert sum(json.loads(capsys.readouterr().out)["probabilities"].values()) == pytest.approx(1, abs=1e-2)


def test_onnx_backend_refuses_a_device(dirs, capsys):
    assert main(["generate", dirs["MODEL"], "hi", "--backend", "onnx", "--dtype", "bfloat16"]) == 2
    assert "--backend onnx runs the exported float32 graph" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the library
def test_load_in_bfloat16_returns_bf16_parameters_and_generates(dirs):
    model, tokenizer = slmkit.load(dirs["MODEL"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    text = slmkit.generate(model, tokenizer, "The quick", max_new_tokens=6, temperature=0.0)
    assert isinstance(text, str) and text
    reference, _ = slmkit.load(dirs["MODEL"])
    assert {p.dtype for p in reference.parameters()} == {torch.float32}  # the default stays as stored


@pytest.mark.parametrize("method", ["int4", "fp8"])
def test_a_quantized_model_in_bfloat16_keeps_its_stored_codes(dirs, tmp_path, method):
    model, tokenizer = slmkit.load(dirs["MODEL"])
    save_model_dir(model, tmp_path / "q", tokenizer, quantization=quantize_model(model, method))
    bf16 = load_model(tmp_path / "q", dtype="bfloat16")
    layer = bf16.layers[0].mlp.down_proj
    assert isinstance(layer, (QuantizedLinear, FP8Linear))
    assert layer.qweight.dtype == (torch.uint8 if method == "int4" else torch.float8_e4m3fn)
    assert layer.scales.dtype == torch.float32 and bf16.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected, got = model(x), bf16(x)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: logits of a few units agree to a few hundredths
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.1)
    assert isinstance(slmkit.generate(bf16, tokenizer, "The quick", max_new_tokens=4), str)
