"""GGUF export of imported Hugging Face models: each tokenizer layout maps to the llama.cpp
pre-tokenizer with the same regexes, Llama-3 RoPE scaling goes in as `rope_freqs`, and llama.cpp
(llama-cpp-python) tokenizes and continues greedily exactly as slmkit does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf", reason="needs the gguf extra (gguf)")

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

import slmkit
from slmkit.convert import from_hf
from slmkit.errors import ExportError
from slmkit.export.gguf import QWEN2_PATTERN, export_gguf
from slmkit.generation import generate_ids
from slmkit.tokenizer.pretokenize import GPT4_PATTERN

TEXTS = [
    "The quick brown fox jumps over the lazy dog 1234567 times.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(3, 42))",
    "  multiple   spaces\n\n and\ttabs  I'm you'RE they'll",
    "café naïve Ελληνικά 中文 🤖",
]
SIZES = {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.1}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name: (HF config, tokenizer layout, the llama.cpp pre-tokenizer it must map to)
CASES = {
    "llama3": (transformers.LlamaConfig, dict(SIZES, rope_parameters=LLAMA3_ROPE), "llama3", "llama-bpe"),
    "qwen2": (transformers.Qwen2Config, SIZES, "qwen2", "qwen2"),
    "smollm": (transformers.LlamaConfig, dict(SIZES, tie_word_embeddings=True), "smollm", "smollm"),
    "gpt2-split": (transformers.LlamaConfig, SIZES, "gpt2", "gpt-2"),
}


def trained_tokenizer(layout: str) -> tuple[tokenizers.Tokenizer, dict]:
    """A byte-level BPE tokenizer laid out as the real ones are, and its tokenizer_config.json."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    specials, config = ["<|endoftext|>"], {"eos_token": "<|endoftext|>"}
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=layout == "llama3"))
    if layout == "llama3":  # Split on the gpt4 regex, a BOS added by the post-processor
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"), byte_level])
        specials, config = ["<|begin_of_text|>", "<|end_of_text|>"], {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"}
    elif layout == "qwen2":  # NFC, then single digits
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"), byte_level])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    elif layout == "smollm":  # SmolLM2: digits split off one by one, then GPT-2's byte-level regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=380, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 30, trainer)
    if layout == "llama3":
        bos = config["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok, config


def imported(case: str, root: Path) -> Path:
    """A tiny random HF model with its tokenizer, through `slmkit convert from-hf`."""
    config_cls, options, layout, _ = CASES[case]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_cls(**options)).eval()
    hf.save_pretrained(root / "hf")
    tok, tok_config = trained_tokenizer(layout)
    tok.save(str(root / "hf" / "tokenizer.json"))
    (root / "hf" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return from_hf(root / "hf", root / "model")


def fields(path: Path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_tokenizers_map_to_their_llama_cpp_pre_tokenizer(case, tmp_path):
    path = export_gguf(imported(case, tmp_path), tmp_path / "m.gguf", type="f32")
    kv = fields(path)
    assert kv["tokenizer.ggml.pre"] == CASES[case][3] and kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    _, tokenizer = slmkit.load(tmp_path / "model")
    source = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in source["merges"]]
    assert kv["tokenizer.ggml.tokens"][tokenizer.eot_id] == tokenizer.eot_token
    assert kv["tokenizer.ggml.add_bos_token"] is (case == "llama3")


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_a_model_imported_from_gguf_exports_with_its_pre_tokenizer(pre, tmp_path):
    """The GGUF importer writes llama.cpp's own spelling of the split regexes into tokenizer.json."""
    from gguf_files import tiny_gguf

    from slmkit.convert import from_gguf

    model_dir = from_gguf(tiny_gguf(tmp_path / "in.gguf", pre=pre), tmp_path / "model")
    assert fields(export_gguf(model_dir, tmp_path / "out.gguf", type="f32"))["tokenizer.ggml.pre"] == pre


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    path = export_gguf(imported("llama3", tmp_path), tmp_path / "m.gguf", type="f16")
    reader = gguf.GGUFReader(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32"
    # convert_hf_to_gguf's factors: 1 for short wavelengths, `factor` for long ones, smooth in between
    head_dim, rope = 16, LLAMA3_ROPE
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    wavelen = 2 * torch.pi / inv_freq
    smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
    expected = torch.where(wavelen < rope["original_max_position_embeddings"] / rope["high_freq_factor"], torch.ones_like(wavelen),
                           torch.where(wavelen > rope["original_max_position_embeddings"] / rope["low_freq_factor"],
                                       torch.full_like(wavelen, rope["factor"]), 1 / ((1 - smooth) / rope["factor"] + smooth)))
    torch.testing.assert_close(torch.from_numpy(freqs.data.copy()), expected, rtol=1e-5, atol=0)


def test_a_tokenizer_llama_cpp_cannot_split_alike_is_refused(tmp_path):
    model_dir = imported("gpt2-split", tmp_path)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r"^GGUF cannot express the tokenizer's Whitespace pre-tokenizer step"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Isolated", "invert": False}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match=r"^GGUF needs a pre-tokenizer llama.cpp knows .*other regexes: \\s\+$"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_tokenizes_and_continues_an_imported_model_as_slmkit_does(case, kind, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from slmkit.eval.llama_cpp import greedy_ids, open_gguf

    model_dir = imported(case, tmp_path)
    model, tokenizer = slmkit.load(model_dir)
    llm = open_gguf(export_gguf(model_dir, tmp_path / "m.gguf", type=kind), n_ctx=128, n_threads=1)
    try:
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
            assert llm.tokenize(text.encode()) == tokenizer.encode_with_template(text), text  # BOS as transformers adds it
        if kind == "f32":  # q8_0 quantizes activations too: its tokens may part ways
            for text in TEXTS[:3]:
                ids = tokenizer.encode(text)[:12]
                assert greedy_ids(llm, ids, 16) == generate_ids(model, [ids], 16)[0], text
    finally:
        llm.close()
