"""GGUF export: the file read back with gguf.GGUFReader, unsupported architectures refused,
the Ollama Modelfile, and llama.cpp parity (greedy tokens, perplexity) when llama-cpp-python
is installed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.errors import ExportError
from slmkit.eval.perplexity import perplexity_of_texts
from slmkit.tokenizer.pretokenize import token_to_str

gguf = pytest.importorskip("gguf", reason="needs the gguf extra (gguf)")

from tiny_models import TEXT
from tiny_models import model_dir as make_model_dir

from slmkit.export.gguf import export_gguf, permute_for_llama_rope

GPT2_STYLE = {"norm": "layernorm", "mlp": "gelu_tanh", "pos": "learned", "attn_bias": True, "mlp_bias": True, "n_kv_heads": 4}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gguf") / "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("gguf") / "gpt2", pattern="gpt2", **GPT2_STYLE)


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(reader) -> dict[str, np.ndarray]:
    """Tensors by name, in PyTorch's [out, in] order."""
    return {t.name: np.asarray(t.data).reshape(list(reversed([int(d) for d in t.shape]))) for t in reader.tensors}


def test_llama_file_reads_back_with_keys_tokenizer_and_permuted_rope(llama_dir, tmp_path):
    path = export_gguf(llama_dir, tmp_path / "m.gguf", type="f32")
    reader = gguf.GGUFReader(path)
    kv = fields(reader)
    model, tokenizer = slmkit.load(llama_dir)
    cfg = model.cfg
    assert kv["general.architecture"] == "llama"
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.attention.head_count"],
            kv["llama.attention.head_count_kv"], kv["llama.context_length"]) == (2, 64, 4, 2, 128)
    assert kv["llama.rope.freq_base"] == cfg.rope_theta and kv["llama.rope.dimension_count"] == cfg.head_dim
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["tokenizer.ggml.tokens"][:300] == [token_to_str(tokenizer.vocab[i]) for i in range(300)]
    assert kv["tokenizer.ggml.tokens"][tokenizer.eot_id] == "<|endoftext|>"
    assert kv["tokenizer.ggml.token_type"][tokenizer.eot_id] == gguf.TokenType.CONTROL
    assert len(kv["tokenizer.ggml.merges"]) == len(tokenizer.merges)
    assert kv["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id and kv["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    ts = tensors(reader)
    assert "output.weight" not in ts  # tied: llama.cpp reuses token_embd
    assert len(ts) == 2 + 9 * cfg.n_layers
    sd = model.state_dict()
    for name, key in (("token_embd.weight", "embed_tokens.weight"), ("blk.1.ffn_gate.weight", "layers.1.mlp.gate_proj.weight"),
                      ("blk.0.attn_v.weight", "layers.0.self_attn.v_proj.weight")):
        np.testing.assert_array_equal(ts[name], sd[key].numpy())
    np.testing.assert_array_equal(ts["blk.0.attn_k.weight"], permute_for_llama_rope(sd["layers.0.self_attn.k_proj.weight"], 2).numpy())


def test_rope_permutation_maps_half_split_pairs_to_adjacent_pairs():
    rows = torch.arange(2 * 8).float()[:, None]  # 2 heads of head_dim 8: rows (i, i + 4) pair up
    out = permute_for_llama_rope(rows, 2).flatten().tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_gpt2_file_has_fused_qkv_and_untied_output(gpt2_dir, tmp_path):
    untied = make_model_dir(tmp_path / "untied", steps=0, pattern="gpt2", tie_embeddings=False,
                            **{**GPT2_STYLE, "mlp_bias": False})
    for directory in (gpt2_dir, untied):
        reader = gguf.GGUFReader(export_gguf(directory, tmp_path / f"{directory.name}.gguf", type="f16"))
        kv, ts = fields(reader), tensors(reader)
        assert kv["general.architecture"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
        assert ts["blk.0.attn_qkv.weight"].shape == (3 * 64, 64) and ts["blk.0.attn_qkv.weight"].dtype == np.float16
        assert ts["position_embd.weight"].shape == (128, 64)
        assert ("output.weight" in ts) == (directory == untied)
    np.testing.assert_array_equal(ts["blk.1.ffn_up.bias"], np.zeros(256, dtype=np.float32))  # absent bias -> zeros


@pytest.mark.parametrize("kind, qtype", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_quantized_files_use_the_gguf_block_types(llama_dir, tmp_path, kind, qtype):
    reader = gguf.GGUFReader(export_gguf(llama_dir, tmp_path / f"{kind}.gguf", type=kind))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0"
    f32 = export_gguf(llama_dir, tmp_path / "f32.gguf", type="f32", force=True)
    assert (tmp_path / f"{kind}.gguf").stat().st_size < 0.4 * f32.stat().st_size


@pytest.mark.parametrize("overrides, feature", [
    ({"pos": "alibi"}, "alibi positions"),
    ({"norm": "layernorm"}, "layernorm in a llama-style"),
    ({"qk_norm": True}, "qk_norm"),
    ({"mlp": "gelu"}, "gelu MLP"),
    ({"logit_softcap": 30.0}, "logit_softcap"),
    ({**GPT2_STYLE, "mlp": "gelu"}, "gelu MLP in a gpt2-style"),
])
def test_architectures_gguf_cannot_express_are_refused(tmp_path, overrides, feature):
    directory = make_model_dir(tmp_path / "m", steps=0, **overrides)
    with pytest.raises(ExportError, match=f"GGUF cannot express {feature}"):
        export_gguf(directory, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == []


def test_cli_error_for_an_unknown_split_pattern(tmp_path, capsys):
    from slmkit.model.io import save_model_dir
    from slmkit.tokenizer import train_bpe

    model, _ = slmkit.load(make_model_dir(tmp_path / "m", steps=0))
    save_model_dir(model, tmp_path / "custom", train_bpe([TEXT * 4], 320, pattern=r"\S+|\s+"))
    assert main(["export", "gguf", str(tmp_path / "custom"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GGUF needs a pre-tokenizer llama.cpp knows (llama-bpe, qwen2, smollm, gpt-2); "
                          "this tokenizer splits text with other regexes: \\S+|\\s+") and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()


def test_cli_writes_the_file_and_an_ollama_modelfile(llama_dir, tmp_path, capsys):
    out = tmp_path / "ship" / "model.gguf"
    assert main(["export", "gguf", str(llama_dir), "--out", str(out), "--type", "q8_0", "--modelfile"]) == 0
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert ('TEMPLATE """{{ range .Messages }}'
            '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
            '{{ end }}{{ end }}<|im_start|>assistant\n"""') in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.0" in modelfile and "PARAMETER num_ctx 128" in modelfile
    assert main(["export", "gguf", str(llama_dir), "--out", str(out)]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err


# ---------------------------------------------------------------------------- llama.cpp
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; it compiles llama.cpp)")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-with-biases"])
@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_greedy_continuation_equals_slmkit(llama_dir, gpt2_dir, tmp_path, arch, kind):
    llama_cpp()
    from slmkit.eval.llama_cpp import greedy_ids, open_gguf
    from slmkit.generation import generate_ids

    if arch == "llama-with-biases":  # q/k biases are permuted like their weights
        directory = make_model_dir(tmp_path / "biased", attn_bias=True, mlp_bias=True)
    else:
        directory = llama_dir if arch == "llama" else gpt2_dir
    model, tokenizer = slmkit.load(directory)
    path = export_gguf(directory, tmp_path / f"{arch}-{kind}.gguf", type=kind)
    llm = open_gguf(path, n_ctx=128, n_threads=1)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer.encode(TEXT)
        for prompt in ("The quick brown", "def add(a, b):\n", "User: hello"):
            ids = tokenizer.encode(prompt)
            expected = generate_ids(model, [ids], 24)[0]
            assert len(expected) == 24
            assert greedy_ids(llm, ids, 24) == expected, prompt
    finally:
        llm.close()


def test_llama_cpp_perplexity_f32_matches_slmkit_and_q8_0_is_within_one_percent(llama_dir, tmp_path):
    llama_cpp()
    from slmkit.eval.llama_cpp import open_gguf, perplexity_of_ids

    model, tokenizer = slmkit.load(llama_dir)
    texts = [TEXT, "The lazy fox jumps over the quick dog.\nprint(add(3, 2))\n" * 3]
    documents = [[tokenizer.eot_id] + tokenizer.encode_ordinary(t) for t in texts]
    reference = perplexity_of_texts(model, tokenizer, texts, context=64, stride=32).perplexity
    ppl = {}
    for kind in ("f32", "q8_0"):
        llm = open_gguf(export_gguf(llama_dir, tmp_path / f"{kind}.gguf", type=kind), n_ctx=128, logits_all=True, n_threads=1)
        try:
            ppl[kind] = perplexity_of_ids(llm, documents, context=64, stride=32)
        finally:
            llm.close()
    assert math.isclose(ppl["f32"], reference, rel_tol=1e-3)
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01
