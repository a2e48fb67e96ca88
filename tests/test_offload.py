"""Offloaded generation: blocks streamed from CPU memory or from the memory-mapped safetensors
file give exactly the outputs of the ordinary model, with at most two blocks on the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close
from tiny_models import model_dir as make_model_dir

import slmkit
from slmkit.cli import main
from slmkit.errors import InputError
from slmkit.generation.offload import load_offloaded, offload_stats


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("offload") / "model", steps=0, n_layers=4)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offloaded_outputs_equal_the_ordinary_model(model_dir, mode):
    model, tokenizer = slmkit.load(model_dir)
    offloaded, _ = load_offloaded(model_dir, mode, device="cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.inference_mode():
        assert torch.equal(offloaded(ids, attention_mask=mask), model(ids, attention_mask=mask))
    prompts = ["The quick brown", "def add(a, b):\n"]
    assert slmkit.generate(offloaded, tokenizer, prompts, 30) == slmkit.generate(model, tokenizer, prompts, 30)
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 1}
    assert slmkit.generate(offloaded, tokenizer, "User:", 20, **sampled) == slmkit.generate(model, tokenizer, "User:", 20, **sampled)
    assert all(p.is_meta for p in offloaded.layers.parameters())  # nothing left behind after a run


def test_memory_report_counts_at_most_two_blocks(model_dir):
    offloaded, tokenizer = load_offloaded(model_dir, "disk", device="cpu")
    slmkit.generate(offloaded, tokenizer, "The quick", 5)
    stats = offload_stats(offloaded)
    block_bytes = sum(p.numel() * 4 for p in slmkit.load(model_dir)[0].layers[0].parameters())
    assert stats.layer_bytes == 4 * block_bytes
    assert stats.peak_layer_bytes == 2 * block_bytes  # the running block and the prefetched next one
    assert stats.peak_device_bytes is None and stats.peak_rss_bytes > 0
    assert "offload disk -> cpu" in stats.summary()


def test_cli_offload_prints_the_same_text_and_the_memory_report(model_dir, capsys):
    assert main(["generate", str(model_dir), "The quick", "--max-new-tokens", "20"]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(model_dir), "The quick", "--max-new-tokens", "20", "--offload", "disk"]) == 0
    out, err = capsys.readouterr()
    assert out == expected and "offload disk" in err and "peak RSS" in err


def test_bad_offload_requests_are_refused(model_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="choose cpu or disk"):
        load_offloaded(model_dir, "gpu")
    with pytest.raises(InputError, match="no model config"):
        load_offloaded(tmp_path, "disk")
    assert main(["generate", str(model_dir), "hi", "--offload", "cpu", "--backend", "onnx"]) == 2
    assert "does not apply to --backend onnx" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the side-stream prefetch")
def test_offload_to_cuda_streams_blocks_on_a_side_stream(model_dir):
    model, _ = slmkit.load(model_dir)
    offloaded, _ = load_offloaded(model_dir, "cpu", device="cuda")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = offloaded(ids.cuda()).cpu()
        expected = model.cuda()(ids.cuda()).cpu()
    assert_close(got, expected, 1e-5)
    assert offload_stats(offloaded).peak_device_bytes > 0
