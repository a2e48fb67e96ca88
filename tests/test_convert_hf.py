"""Open-weights interop: tiny random transformers models of every family import with the same
logits and greedy tokens, export back to transformers the same way, and bring their tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import assert_close, shared_path
from test_tokenizer_hf import BUILTIN, hf_trained

import slmkit
from slmkit.config import ModelConfig
from slmkit.convert import from_hf, resize_token_embeddings, to_hf
from slmkit.errors import InputError, TokenizerError
from slmkit.generation import SamplingParams
from slmkit.generation.api import generate_ids
from slmkit.model import Transformer
from slmkit.model.io import load_model, save_model_dir
from slmkit.tokenizer.hf_backend import HFTokenizer

TOL = 1e-4
SIZES = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
DEEPSEEK = dict(SIZES, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
FAMILIES = {  # name: (config class, options, tokenizer layout)
    "gpt2": ("GPT2Config", {"vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "gpt2"),
    "llama2": ("LlamaConfig", dict(SIZES, num_key_value_heads=4), "llama3"),
    "llama3": ("LlamaConfig", dict(SIZES, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True), "llama3"),
    "mistral": ("MistralConfig", dict(SIZES, sliding_window=8), "llama3"),
    "qwen2": ("Qwen2Config", SIZES, "qwen2"),
    "qwen3": ("Qwen3Config", dict(SIZES, head_dim=32), "qwen2"),
    "gemma": ("GemmaConfig", dict(SIZES, head_dim=16), "llama3"),
    "gemma2": ("Gemma2Config", dict(SIZES, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0), "llama3"),
    # seven layers: five sliding-window ones, a global one, a sliding one again; each kind its own RoPE base
    "gemma3": ("Gemma3TextConfig", dict(SIZES, num_hidden_layers=7, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}}),
               "llama3"),
    # the final soft-cap applies; the attention one Gemma 3 leaves unused (so does slmkit), and llama3 RoPE scaling
    "gemma3-softcaps": ("Gemma3TextConfig", dict(SIZES, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
                                                 final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                                                 rope_parameters={"full_attention": LLAMA3_ROPE,
                                                                  "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
                        "llama3"),
    "phi3": ("Phi3Config", dict(SIZES, pad_token_id=0, eos_token_id=1), "llama3"),
    "mixtral": ("MixtralConfig", dict(SIZES, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2), "llama3"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(SIZES, head_dim=32, moe_intermediate_size=32, num_local_experts=8,
                                         num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0]), "qwen2"),
    "deepseek_v3": ("DeepseekV3Config", dict(DEEPSEEK, rope_interleave=False), "llama3"),
    # the defaults of a real checkpoint (interleaved RoPE rows, 8 expert groups, 3 dense layers, ...) at toy sizes
    "deepseek_v3-defaults": ("DeepseekV3Config", dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                                      q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                                      v_head_dim=12, moe_intermediate_size=32, n_routed_experts=16), "llama3"),
}
TEXTS = BUILTIN + ["  multiple   spaces\n\n\n and\ttabs  ", "emoji 🤖🚀 and accents café naïve Ελληνικά", ""]
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ bos_token if loop.first else '' }}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def randomize(model: torch.nn.Module) -> None:
    """Random norms and biases, so that a misplaced one shows up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router selection bias
                b.normal_(std=0.05)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """tokenizer.json + tokenizer_config.json (with a chat template) in each byte-level layout."""
    out = {}
    for style, eos, bos in (("gpt2", "<|endoftext|>", None), ("llama3", "<|end_of_text|>", "<|begin_of_text|>"),
                            ("qwen2", "<|im_end|>", None)):
        tok = hf_trained(style, BUILTIN * 20 + TEXTS, vocab_size=480)
        if bos:
            from tokenizers import processors

            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
        directory = tmp_path_factory.mktemp(f"tok-{style}")
        tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos, "chat_template": TEMPLATE}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        out[style] = directory
    return out


def hf_model(family: str, seed: int = 0):
    cls, options, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**options, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    return model


def save_hf(family: str, directory: Path, tokenizer_dirs: dict[str, Path]) -> torch.nn.Module:
    model = hf_model(family)
    model.save_pretrained(directory)
    for f in tokenizer_dirs[FAMILIES[family][2]].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    return model


def hf_greedy(model, prompt: list[int], n: int = 20) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def assert_same_model(hf, ours: Transformer) -> None:
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, TOL)
    prompt = ids[0, :8].tolist()
    assert generate_ids(ours, [prompt], 20, SamplingParams(temperature=0.0))[0] == hf_greedy(hf, prompt)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip(family: str, tmp_path: Path, tokenizer_dirs) -> None:
    hf = save_hf(family, tmp_path / "hf", tokenizer_dirs)
    from_hf(tmp_path / "hf", tmp_path / "ours")
    model, tokenizer = slmkit.load(tmp_path / "ours")
    assert_same_model(hf, model)

    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(tokenizer, HFTokenizer)
    for text in TEXTS:
        assert tokenizer.encode(text, allowed_special="all") == auto(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.encode_with_template(text) == auto(text)["input_ids"]

    to_hf(tmp_path / "ours", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    # the first family that expresses the config exactly: a Phi-3 is a Llama with fused tensors
    assert type(back).__name__ == ("LlamaForCausalLM" if family == "phi3" else type(hf).__name__)
    assert_same_model(back, model)
    auto_back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert [auto_back(t)["input_ids"] for t in TEXTS] == [auto(t)["input_ids"] for t in TEXTS]


def test_family_export_keeps_the_source_family(tmp_path: Path, tokenizer_dirs) -> None:
    """A Phi-3 is also expressible as Llama; --family writes the fused Phi-3 layout instead."""
    hf = save_hf("phi3", tmp_path / "hf", tokenizer_dirs)
    from_hf(tmp_path / "hf", tmp_path / "ours")
    to_hf(tmp_path / "ours", tmp_path / "llama")
    to_hf(tmp_path / "ours", tmp_path / "phi3", family="phi3")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "phi3").eval()
    assert type(back).__name__ == "Phi3ForCausalLM"
    assert_same_model(hf, slmkit.load(tmp_path / "ours")[0])
    with pytest.raises(InputError, match="cannot be written as gpt2: norm='rmsnorm'"):
        to_hf(tmp_path / "ours", tmp_path / "gpt2", family="gpt2")


def test_slmkit_presets_export(tmp_path: Path) -> None:
    cases = {"llama": ModelConfig.from_preset("tiny", vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
             "gpt2": ModelConfig.from_preset("gpt2-small", vocab_size=300, d_model=64, n_layers=2, n_heads=4, context_length=64)}
    for name, cfg in cases.items():
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        randomize(model)
        save_model_dir(model, tmp_path / name)
        to_hf(tmp_path / name, tmp_path / f"{name}-hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-hf").eval()
        assert hf.config.model_type == name
        assert_same_model(hf, model)
    save_model_dir(Transformer(cases["llama"].replace(pos="alibi", qk_norm=True)), tmp_path / "alibi")
    with pytest.raises(InputError, match=r"no Hugging Face equivalent.*pos='alibi'"):
        to_hf(tmp_path / "alibi", tmp_path / "alibi-hf")


def test_safetensors_shards_and_pickle_checkpoints(tmp_path: Path) -> None:
    hf = hf_model("llama2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    from_hf(tmp_path / "sharded", tmp_path / "a", dtype="bfloat16")
    assert_close = load_model(tmp_path / "a")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - assert_close(ids)).abs().max() < 0.5  # bf16 storage: close, not exact

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_bytes((tmp_path / "sharded" / "config.json").read_bytes())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_hf(tmp_path / "bin", tmp_path / "b")
    assert_same_model(hf, load_model(tmp_path / "b"))

    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(InputError, match=f"shard {shard.name} named in model.safetensors.index.json is missing"):
        from_hf(tmp_path / "sharded", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_to_hf_writes_shards_with_the_standard_index(tmp_path: Path, tokenizer_dirs) -> None:
    from slmkit.cli import main

    hf = save_hf("llama2", tmp_path / "hf", tokenizer_dirs)
    from_hf(tmp_path / "hf", tmp_path / "ours")
    assert main(["convert", "to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back"), "--max-shard-size", "100KB"]) == 0
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "back").glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (tmp_path / "back" / "model.safetensors").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert_same_model(back, load_model(tmp_path / "ours"))
    from_hf(tmp_path / "back", tmp_path / "again")  # and slmkit reads them back
    assert_same_model(hf, load_model(tmp_path / "again"))
    with pytest.raises(InputError, match="max shard size '5 gigs' is not a size"):
        to_hf(tmp_path / "ours", tmp_path / "bad", max_shard_size="5 gigs")
    assert not (tmp_path / "bad").exists()


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    hf = hf_model("llama2")
    hf.config.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({**hf.state_dict(), "evil": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="refused to load .*pytorch_model.bin.*could run code"):
        from_hf(tmp_path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bad_input(tmp_path: Path) -> None:
    hf = hf_model("llama2")
    hf.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(InputError, match=r"unsupported architecture.*'bert'.*supported: gpt2 \(GPT2LMHeadModel\), llama"):
        from_hf(tmp_path / "hf", tmp_path / "out")

    config_path.write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(InputError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \(96, 64\), but config.json implies \(128, 64\)"):
        from_hf(tmp_path / "hf", tmp_path / "out")

    config_path.write_text(json.dumps({**config, "attn_temperature_tuning": 4}))
    with pytest.raises(InputError, match="does not understand .*: attn_temperature_tuning"):
        from_hf(tmp_path / "hf", tmp_path / "out")
    with pytest.warns(UserWarning, match="attn_temperature_tuning"):
        from_hf(tmp_path / "hf", tmp_path / "out", strict=False)

    config_path.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(InputError, match="rope type 'yarn' is not supported"):
        from_hf(tmp_path / "hf", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_hub_id_offline_names_the_local_alternative(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-m", "slmkit", "convert", "from-hf", "someorg/some-model", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "cannot download someorg/some-model" in result.stderr and "pass that local DIR instead" in result.stderr


def test_gpt2_vocab_and_merges_import(tmp_path: Path) -> None:
    """GPT-2 as it ships (vocab.json + merges.txt) encodes exactly like transformers' GPT2Tokenizer."""
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    hf_trained("gpt2", BUILTIN * 20, vocab_size=480).model.save(str(tmp_path / "hf"))
    from_hf(tmp_path / "hf", tmp_path / "ours")
    _, tokenizer = slmkit.load(tmp_path / "ours")
    reference = transformers.GPT2Tokenizer(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt"))
    for text in TEXTS:
        assert tokenizer.encode(text, allowed_special="all") == reference(text)["input_ids"], text


def test_chat_template_matches_transformers_and_is_sandboxed(tokenizer_dirs) -> None:
    ours = HFTokenizer.load_dir(tokenizer_dirs["llama3"])
    auto = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["llama3"])
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi 👋"}]
    for prompt in (False, True):
        expected = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected
    assert ours.apply_chat_template(messages, tokenize=True) == ours.encode(ours.apply_chat_template(messages), allowed_special="all")
    with pytest.raises(TokenizerError, match="chat template: unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    for attack in ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "{% set _ = messages.append(1) %}"):
        ours.chat_template = attack
        with pytest.raises(TokenizerError, match="unsafe operation"):
            ours.apply_chat_template(messages)


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied: bool) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, tie_embeddings=tied)).eval()
    bigger = resize_token_embeddings(model, 104).eval()
    old = model.embed_tokens.weight
    assert bigger.cfg.vocab_size == 104 and bigger.embed_tokens.weight.shape == (104, 32)
    assert torch.equal(bigger.embed_tokens.weight[:100], old)
    assert torch.allclose(bigger.embed_tokens.weight[100:], old.mean(0).expand(4, 32))
    assert torch.allclose(bigger.lm_head.weight[100:], model.lm_head.weight.mean(0).expand(4, 32))
    assert (bigger.lm_head.weight is bigger.embed_tokens.weight) == tied
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(bigger(ids)[..., :100], model(ids))
    assert bigger(torch.tensor([[103]])).shape == (1, 1, 104)


def test_imported_model_generates_chats_and_scores(tmp_path: Path, tokenizer_dirs) -> None:
    from slmkit.cli import main
    from slmkit.eval.perplexity import perplexity_of_texts
    from slmkit.generation.chat import ChatSession

    save_hf("qwen2", tmp_path / "hf", tokenizer_dirs)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    model, tokenizer = slmkit.load(tmp_path / "m")
    text = slmkit.generate(model, tokenizer, "Hello world", max_new_tokens=5)
    assert isinstance(text, str)
    reply = "".join(ChatSession(model, tokenizer, max_new_tokens=5).send("hi"))
    assert isinstance(reply, str)
    result = perplexity_of_texts(model, tokenizer, TEXTS[:2])
    assert 1.0 < result.perplexity < 5 * 512
    assert main(["convert", "to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 2  # exists


def test_continued_pretraining_on_peps_lowers_perplexity(tmp_path: Path, tokenizer_dirs) -> None:
    """Import a tiny HF Llama, shard PEPs with its tokenizer, `pretrain --init` it: held-out perplexity drops."""
    from slmkit.data import prepare
    from slmkit.eval.perplexity import perplexity_of_texts
    from slmkit.train import TrainConfig, pretrain

    records = [json.loads(line) for line in shared_path("python-peps", "peps_final_active_accepted.jsonl").open(encoding="utf-8")]
    paragraphs = [p for r in records[:40] for p in r["text"].split("\n\n") if len(p) > 40]
    held_out = [p for r in records[-3:] for p in r["text"].split("\n\n") if len(p) > 40][:60]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")

    options = FAMILIES["llama3"][1]
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**options, "max_position_embeddings": 64}))
    hf.save_pretrained(tmp_path / "hf")
    tok = hf_trained("llama3", paragraphs, vocab_size=480)
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    from_hf(tmp_path / "hf", tmp_path / "init")

    model, tokenizer = slmkit.load(tmp_path / "init")
    prepare([tmp_path / "docs.jsonl"], tokenizer, tmp_path / "data", val_fraction=0.05, dedup="none",
            max_nonalnum_ratio=None, max_repeated_line_ratio=None, progress=False)
    before = perplexity_of_texts(model, tokenizer, held_out).perplexity
    pretrain(TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), init=str(tmp_path / "init"), max_steps=40,
                         batch_size=8, lr=3e-3, warmup_steps=4, eval_every=0, save_every=0, log_every=10, peak_flops=1e11),
             force=True, progress=False)
    after = perplexity_of_texts(*slmkit.load(tmp_path / "run" / "final"), held_out).perplexity
    assert after < 0.5 * before, (before, after)


def test_from_hf_keeps_the_sources_generation_settings_and_warns_in_one_line(tmp_path: Path, tokenizer_dirs, capsys) -> None:
    from slmkit.cli import main

    save_hf("llama2", tmp_path / "hf", tokenizer_dirs)
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_model_name_or_path": "org/model"}))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    from_hf(tmp_path / "hf", tmp_path / "plain")  # _model_name_or_path is harmless
    assert json.loads((tmp_path / "plain" / "generation.json").read_text()) == {"stop_tokens": [2]}

    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3], "temperature": 0.6, "top_p": 0.9}))
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "attn_temperature_tuning": 4}))
    capsys.readouterr()
    assert main(["convert", "from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m"), "--allow-unknown-config"]) == 0
    err = capsys.readouterr().err
    assert err == ("warning: config.json has keys the llama mapping does not understand and that may change the model's "
                   "outputs: attn_temperature_tuning\n")
    assert json.loads((tmp_path / "m" / "generation.json").read_text()) == {"stop_tokens": [2, 3], "temperature": 0.6, "top_p": 0.9}
