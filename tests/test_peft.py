"""PEFT interop, both ways: slmkit's LoRA adapters load in `peft` onto the `convert to-hf` export
with the same logits, adapters PEFT wrote load, merge and serve in slmkit with PEFT's logits, and a
wrong adapter is one clear error that changes nothing."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import assert_close, shared_path
from test_convert_hf import hf_model, save_hf, tokenizer_dirs  # noqa: F401  (tokenizer_dirs: a fixture)

import slmkit
from slmkit.cli import main
from slmkit.convert import from_hf, to_hf
from slmkit.convert.peft import export_peft
from slmkit.errors import InputError
from slmkit.model.io import load_model
from slmkit.model.lora import LoRALinear, import_adapter, inject_lora, load_adapter, merge_adapter_dir, save_adapter
from slmkit.serve.adapters import MultiLoRA, MultiLoRALinear

TOL = 1e-4
IDS = torch.randint(0, 480, (2, 16), generator=torch.Generator().manual_seed(1))
# family: (what slmkit adapts, what PEFT adapts, the `to_hf` family); GPT-2 and Phi-3 fuse q, k, v
# (and Phi-3 gate, up) into one HF linear; DeepSeek-V3's q_b_proj and kv_a_proj rows are reordered
CASES = {
    "llama2": (["q", "k", "v", "o", "gate", "up", "down"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    "qwen2": (["q", "v", "o", "up"], ["q_proj", "v_proj", "down_proj"], None),
    "gpt2": (["q", "v", "o", "up"], ["c_attn", "c_proj", "c_fc"], None),
    "phi3": (["q", "k", "gate", "o"], ["qkv_proj", "gate_up_proj", "o_proj"], "phi3"),
    "deepseek_v3-defaults": (["q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                             ["q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"], None),
}


def imported(family: str, tmp_path: Path, tokenizer_dirs) -> tuple[torch.nn.Module, Path]:
    """A random HF model of `family` and its slmkit import."""
    hf = save_hf(family, tmp_path / "hf", tokenizer_dirs)
    from_hf(tmp_path / "hf", tmp_path / "ours")
    return hf, tmp_path / "ours"


def randomize_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (no change); give every adapter a real update."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_load(hf_dir: Path, adapter_dir: Path):
    """PeftModel over the HF checkpoint; PEFT's warnings about keys it missed or did not expect fail."""
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    keys = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not keys, keys
    return model


def peft_adapter(hf, directory: Path, seed: int = 3, **options) -> torch.nn.Module:
    """`hf` with a random PEFT LoRA (B not zero), saved to `directory`."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("family", list(CASES))
def test_slmkit_adapter_loads_in_peft_on_the_hf_export(family: str, tmp_path: Path, tokenizer_dirs) -> None:
    targets, _, export_family = CASES[family]
    _, ours_dir = imported(family, tmp_path, tokenizer_dirs)
    model = load_model(ours_dir)
    base = model(IDS)
    inject_lora(model, rank=4, alpha=8, targets=targets, name="task")
    randomize_adapters(model)
    adapted = model(IDS)
    assert (adapted - base).abs().max() > 0.05  # the adapter matters
    save_adapter(model, ours_dir / "adapters" / "task", "task")

    to_hf(ours_dir, tmp_path / "back", export_family)
    written = tmp_path / "back" / "adapters" / "task"
    assert sorted(p.name for p in written.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "back").resolve())
    theirs = peft_load(tmp_path / "back", written)
    # PEFT adapted exactly the modules slmkit did, nothing more (GPT-2: attn.c_proj but not mlp.c_proj)
    from safetensors import safe_open

    with safe_open(str(written / "adapter_model.safetensors"), "pt") as f:
        stored = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == stored
    with torch.no_grad():
        assert_close(theirs(IDS).logits, adapted, TOL)
        assert_close(theirs.merge_and_unload()(IDS).logits, adapted, TOL)  # PEFT's merge (fan_in_fan_out for GPT-2)

    merge_adapter_dir(ours_dir, tmp_path / "merged", "task")
    with torch.no_grad():
        assert_close(load_model(tmp_path / "merged")(IDS), adapted, TOL)


@pytest.mark.parametrize("family", list(CASES))
def test_peft_adapter_loads_serves_merges_and_exports_in_slmkit(family: str, tmp_path: Path, tokenizer_dirs) -> None:
    _, peft_targets, export_family = CASES[family]
    hf, ours_dir = imported(family, tmp_path, tokenizer_dirs)
    with torch.no_grad():
        base = hf(IDS).logits
    theirs_model = peft_adapter(hf, tmp_path / "peft", target_modules=peft_targets, fan_in_fan_out=family == "gpt2")
    with torch.no_grad():
        theirs = theirs_model(IDS).logits
    assert (theirs - base).abs().max() > 0.05

    model = load_model(ours_dir)
    assert load_adapter(model, tmp_path / "peft", "p") == "p"
    with torch.no_grad():
        assert_close(model(IDS), theirs, TOL)

    served = load_model(ours_dir)  # as `serve --adapter p=DIR` loads it: one batch, rows per adapter
    lora = MultiLoRA(served, {"p": tmp_path / "peft"})
    with torch.no_grad(), lora.selected(["p", None]):
        out = served(IDS)
    assert_close(out[:1], theirs[:1], TOL)
    assert_close(out[1:], base[1:], TOL)

    import_adapter(ours_dir, tmp_path / "peft", "p")
    merge_adapter_dir(ours_dir, tmp_path / "merged", "p")
    with torch.no_grad():
        assert_close(load_model(tmp_path / "merged")(IDS), theirs, TOL)
    to_hf(ours_dir, tmp_path / "back", export_family)  # and back out, loaded by PEFT again
    with torch.no_grad():
        assert_close(peft_load(tmp_path / "back", tmp_path / "back" / "adapters" / "p")(IDS).logits, theirs, TOL)


def test_rank_and_alpha_patterns_and_rslora_both_ways(tmp_path: Path, tokenizer_dirs) -> None:
    hf, ours_dir = imported("llama2", tmp_path, tokenizer_dirs)
    theirs_model = peft_adapter(hf, tmp_path / "peft", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"o_proj": 3},
                                use_rslora=True)
    with torch.no_grad():
        theirs = theirs_model(IDS).logits
    model, _ = slmkit.load(ours_dir, adapter=tmp_path / "peft")
    ranks = {n: m.lora_A["peft"].out_features for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ranks["layers.1.self_attn.q_proj"] == 6 and ranks["layers.0.self_attn.v_proj"] == 2
    with torch.no_grad():
        assert_close(model(IDS), theirs, TOL)

    import_adapter(ours_dir, tmp_path / "peft", "mixed")
    config = json.loads((ours_dir / "adapters" / "mixed" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"v_proj": 2, "1.self_attn.q_proj": 6}
    assert set(config["alpha_pattern"]) == {"v_proj", "1.self_attn.q_proj", "o_proj"}  # rsLoRA's scaling as alpha / r
    export_peft(ours_dir, tmp_path / "exported", "mixed", base_model="org/tiny-llama")
    exported = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "org/tiny-llama" and "use_rslora" not in exported
    to_hf(ours_dir, tmp_path / "back")
    with torch.no_grad():
        assert_close(peft_load(tmp_path / "back", tmp_path / "exported")(IDS).logits, theirs, TOL)


def test_library_and_cli_round_trip(tmp_path: Path, tokenizer_dirs, capsys) -> None:
    _, ours_dir = imported("qwen2", tmp_path, tokenizer_dirs)
    model = load_model(ours_dir)
    inject_lora(model, rank=2, targets=["q", "v"], name="default")
    randomize_adapters(model)
    save_adapter(model, ours_dir / "adapters" / "default")

    assert main(["lora", "export-peft", str(ours_dir), "--out", str(tmp_path / "peft"), "--base-model", "Qwen/x"]) == 0
    assert main(["lora", "import", str(ours_dir), str(tmp_path / "peft"), "--name", "again"]) == 0
    assert (ours_dir / "adapters" / "again" / "adapter.safetensors").is_file()  # stored in slmkit's layout
    capsys.readouterr()
    with torch.no_grad():
        named = slmkit.load(ours_dir, adapter="default")[0](IDS)
        assert_close(slmkit.load(ours_dir, adapter="again")[0](IDS), named, 1e-6)
        assert_close(slmkit.load(ours_dir, adapter=tmp_path / "peft")[0](IDS), named, 1e-6)
    shutil.copytree(tmp_path / "peft", ours_dir / "adapters" / "copied")  # PEFT's layout works in place too
    with torch.no_grad():
        assert_close(slmkit.load(ours_dir, adapter="copied")[0](IDS), named, 1e-6)
    to_hf(ours_dir, tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back" / "adapters").iterdir()) == ["again", "copied", "default"]
    with pytest.raises(InputError, match="no adapter 'nope'"):
        slmkit.load(ours_dir, adapter="nope")


def test_serve_answers_with_a_peft_adapter(tmp_path: Path, tokenizer_dirs) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from slmkit.serve.server import build_app, running

    hf, ours_dir = imported("qwen2", tmp_path, tokenizer_dirs)
    peft_adapter(hf, tmp_path / "peft", target_modules=["q_proj", "v_proj", "o_proj"])
    expected = {}
    for name, adapter in (("ours", None), ("p", tmp_path / "peft")):
        model, tokenizer = slmkit.load(ours_dir, adapter=adapter)
        expected[name] = slmkit.generate(model, tokenizer, "The quick brown", max_new_tokens=8, temperature=0.0)
    assert expected["ours"] != expected["p"]
    with running(build_app(ours_dir, adapters={"p": str(tmp_path / "peft")}, max_batch_tokens=64, block_size=8)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        served = {name: client.completions.create(model=name, prompt="The quick brown", max_tokens=8, temperature=0).choices[0].text
                  for name in expected}
    assert served == expected


def test_wrong_adapters_are_one_clear_error_and_change_nothing(tmp_path: Path, tokenizer_dirs, capsys) -> None:
    _, ours_dir = imported("llama2", tmp_path / "llama", tokenizer_dirs)
    # the same family at another width: shapes do not fit
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=480, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    peft_adapter(other, tmp_path / "narrow", target_modules=["q_proj", "v_proj"])
    # another architecture: GPT-2's module names
    peft_adapter(hf_model("gpt2"), tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    # a LoRA variant slmkit does not run
    peft_adapter(hf_model("llama2"), tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    cases = {"narrow": "another base model", "gpt2": "transformer.h.0.attn.c_attn, which a llama model", "dora": "DoRA|use_dora"}
    capsys.readouterr()
    for name, message in cases.items():
        model = load_model(ours_dir)
        before = model(IDS)
        with pytest.raises(InputError, match=message):
            load_adapter(model, tmp_path / name)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-loaded
        with pytest.raises(InputError, match=message):
            MultiLoRA(model, {"x": tmp_path / name})
        assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
        torch.testing.assert_close(model(IDS), before, rtol=0, atol=0)

        assert main(["lora", "import", str(ours_dir), str(tmp_path / name)]) == 2
        assert main(["serve", str(ours_dir), "--adapter", f"x={tmp_path / name}", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 2 and all(line.startswith("error: ") for line in err.splitlines()), err
        assert not (ours_dir / "adapters").exists()

    moe = tmp_path / "moe"  # experts: transformers holds them as one 3-D tensor, PEFT cannot adapt them one by one
    _, moe_dir = imported("mixtral", moe, tokenizer_dirs)
    model = load_model(moe_dir)
    inject_lora(model, rank=2, targets=["q", "gate"])
    save_adapter(model, moe_dir / "adapters" / "default")
    with pytest.raises(InputError, match="an expert of a mixture-of-experts layer"):
        export_peft(moe_dir, tmp_path / "moe-peft")
    assert not (tmp_path / "moe-peft").exists()


@pytest.mark.real_model
def test_smollm2_lora_sft_adapter_gives_the_same_logits_in_peft(smollm2, tmp_path: Path) -> None:
    from slmkit.finetune import FinetuneConfig, finetune_sft
    from slmkit.model.lora import set_adapter

    records = json.loads(shared_path("llms-from-scratch-instruction", "instruction-data.json").read_text(encoding="utf-8"))
    (tmp_path / "data.json").write_text(json.dumps(records[:20]))
    cfg = FinetuneConfig(max_steps=2, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=0, lora_rank=8,
                         lora_targets=["q", "k", "v", "o", "gate", "up", "down"])
    finetune_sft(smollm2, tmp_path / "data.json", tmp_path / "run", max_length=64, max_responses=1, max_new_tokens=1,
                 cfg=cfg, device="cpu", progress=False)
    final = tmp_path / "run" / "final"
    model, tokenizer = slmkit.load(final, adapter="default")
    ids = torch.tensor([tokenizer.encode("Rewrite the sentence in passive voice: The chef cooked the meal.")])
    with torch.no_grad():
        ours = model(ids)
        set_adapter(model, None)
        base = model(ids)
    assert (ours - base).abs().max() > 0.05  # two steps at a high rate move the logits

    to_hf(final, tmp_path / "hf")
    theirs = peft_load(tmp_path / "hf", tmp_path / "hf" / "adapters" / "default")
    merge_adapter_dir(final, tmp_path / "merged")
    with torch.no_grad():
        peft_logits, merged = theirs(ids).logits, load_model(tmp_path / "merged")(ids)
    print(f"SmolLM2 LoRA SFT adapter ({ids.shape[1]} tokens, max |logit| {ours.abs().max():.1f}, adapter - base "
          f"{(ours - base).abs().max():.3f}): PEFT - slmkit {(peft_logits - ours).abs().max():.2e}, "
          f"merged - adapter {(merged - ours).abs().max():.2e}")
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=1e-5)  # logits reach |30|: rtol covers the large ones
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-5)
