"""LoRA: merged == unmerged logits, exact unmerge, adapter switching, PEFT-layout save/load, QLoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.model.lora import (
    LoRALinear,
    adapter_size_bytes,
    adapters_disabled,
    inject_lora,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge,
    unwrap,
)
from slmkit.model.transformer import Transformer
from slmkit.quant.linear import QuantizedLinear
from slmkit.quant.methods import quantize_int8
from slmkit.train.optim import build_optimizer


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()


def randomize_adapters(model, seed: int) -> None:
    """B starts at zero (no change); give every adapter a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


def test_only_adapters_train_and_reach_the_optimizer():
    model = tiny()
    wrapped = inject_lora(model, rank=4, targets=["q", "v", "down"])
    assert wrapped == [f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in in_optimizer]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trainable, total = trainable_parameters(model)
    ffn = model.cfg.ffn_hidden
    assert trainable == 2 * 4 * ((32 + 32) + (32 + 16) + (ffn + 32))  # layers * rank * (in + out) per wrapped layer
    assert total == sum(p.numel() for p in model.parameters())


def test_fresh_adapter_changes_nothing_and_merge_equals_unmerged():
    model = tiny()
    base = model(IDS)
    inject_lora(model, rank=4, alpha=8, targets=["q", "k", "v", "o", "gate", "up", "down"])
    torch.testing.assert_close(model(IDS), base, rtol=0, atol=0)  # B = 0
    randomize_adapters(model, 0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = model(IDS)
    assert (adapted - base).abs().max() > 1e-3
    merge(model)
    assert_close(model(IDS), adapted, 1e-5)
    unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n  # bit-exact restore
    torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=0)


def test_two_adapters_switch_at_runtime_without_reloading_the_base(tmp_path):
    model = tiny()
    base = model(IDS)
    inject_lora(model, rank=2, name="a")
    inject_lora(model, rank=2, name="b")
    randomize_adapters(model, 0)
    set_adapter(model, "a")
    out_a = model(IDS)
    set_adapter(model, "b")
    out_b = model(IDS)
    assert (out_a - out_b).abs().max() > 1e-3
    set_adapter(model, "a")
    torch.testing.assert_close(model(IDS), out_a, rtol=0, atol=0)
    with adapters_disabled(model):
        torch.testing.assert_close(model(IDS), base, rtol=0, atol=0)
    set_adapter(model, None)
    torch.testing.assert_close(model(IDS), base, rtol=0, atol=0)
    with pytest.raises(InputError, match="no adapter named 'c'"):
        set_adapter(model, "c")


def test_save_load_round_trip_in_peft_layout(tmp_path):
    model = tiny()
    inject_lora(model, rank=4, alpha=16, targets=["q", "v"], name="task")
    randomize_adapters(model, 2)
    expected = model(IDS)
    save_adapter(model, tmp_path / "task", "task")
    config = json.loads((tmp_path / "task" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "task" / "adapter.safetensors")))
    assert keys[0] == "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 8
    assert 0 < adapter_size_bytes(tmp_path / "task") < 20_000

    fresh = tiny()
    assert load_adapter(fresh, tmp_path / "task") == "task"
    torch.testing.assert_close(fresh(IDS), expected, rtol=0, atol=0)


def test_unwrap_after_merge_gives_a_plain_model_with_the_merged_weights():
    model = tiny()
    inject_lora(model, rank=4)
    randomize_adapters(model, 3)
    adapted = model(IDS)
    merge(model)
    unwrap(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    plain = tiny()
    plain.load_state_dict(model.state_dict())  # same keys as an unadapted model
    assert_close(plain(IDS), adapted, 1e-5)


def test_qlora_int8_base_is_close_frozen_and_trains():
    model = tiny()
    reference = model(IDS)
    assert quantize_int8(model) == 2 * 7
    int8 = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(int8) == 2 * 7 and all(m.qweight.dtype == torch.int8 and m.scales.shape[1] == 1 for m in int8)
    assert (model(IDS) - reference).abs().max() < 0.05 * reference.abs().max()
    inject_lora(model, rank=4)
    trainable, _ = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.randint(0, 97, IDS.shape, generator=torch.Generator().manual_seed(5))
    losses = []
    model.train()
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(IDS).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(InputError, match="int8 base"):
        merge(model)


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(InputError, match="no linear layer matches"):
        inject_lora(tiny(), targets=["nonexistent"])
