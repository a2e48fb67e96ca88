"""The same code on a CUDA GPU: mixed precision training (bf16 autocast, fp16 with a gradient
scaler), resume, and decoding. Skipped on machines without one."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from train_helpers import SMALL, losses, run

from slmkit.config import ModelConfig
from slmkit.model import Transformer
from slmkit.train import TrainConfig, pretrain
from slmkit.train.run_metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_gpu_in_every_precision(verdict, tmp_path, precision):
    fp32 = losses(run(verdict, tmp_path / "ref", max_steps=30, precision="fp32", warmup_steps=5))
    trained = losses(run(verdict, tmp_path / precision, max_steps=30, precision=precision, warmup_steps=5))
    assert trained[-1] < trained[0] - 1.0, trained
    assert trained[-1] == pytest.approx(fp32[-1], rel=0.05)
    report = (tmp_path / precision / "report.md").read_text()
    assert f"| precision | {precision} |" in report


def test_fp16_scaler_state_survives_resume(verdict, tmp_path):
    """The loss scale is trainer state: stopping after 4 steps and resuming gives the same losses."""
    settings = dict(data=str(verdict), model=SMALL, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, save_every=4,
                    log_every=1, peak_flops=1e14, precision="fp16")
    pretrain(TrainConfig(out=str(tmp_path / "a"), max_steps=8, **settings), progress=False)
    pretrain(TrainConfig(out=str(tmp_path / "b"), max_steps=4, **settings), progress=False)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-4" / "trainer_state" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    pretrain(TrainConfig(out=str(tmp_path / "b"), max_steps=8, **settings), resume=True, progress=False)
    straight = losses(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    resumed = losses(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert resumed == pytest.approx(straight, rel=1e-3)


@torch.inference_mode()
def test_cached_decoding_matches_full_forward_on_gpu():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=512, context_length=64)).cuda().eval()
    ids = torch.randint(0, 512, (2, 40), device="cuda")
    full = model(ids)
    cache = model.new_cache(2)
    steps = [model(ids[:, :24], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(24, 40)]
    assert_close(torch.cat(steps, dim=1), full, 1e-4)
    cpu = model.cpu()(ids.cpu())
    assert_close(cpu, full.cpu(), 1e-3)
