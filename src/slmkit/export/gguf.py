"""GGUF export for llama.cpp and Ollama, written with the `gguf` package's GGUFWriter.

Two llama.cpp architectures cover slmkit's presets:

- `llama`: RoPE + RMSNorm + SwiGLU (the tiny / llama-* presets). llama.cpp rotates pairs of
  adjacent head dimensions while slmkit (like HF) rotates the two halves of each head, so the
  rows of q_proj and k_proj are permuted head by head (convert_hf_to_gguf's `LlamaModel.permute`).
- `gpt2`: learned positions + LayerNorm + tanh-GELU MLP (the gpt2-* presets); q, k and v are
  fused into one attn_qkv tensor and absent biases are written as zeros (llama.cpp requires them).

A configuration neither can express is refused with an error that names the feature.

The tokenizer goes in as `tokenizer.ggml.model = gpt2` (byte-level BPE): tokens, token types,
merges, end-of-text id and the name of the llama.cpp pre-tokenizer that splits text with the same
regexes (`PRE_TOKENIZERS`: `llama-bpe` for the gpt4 pattern, `gpt-2`, `qwen2`, `smollm`); an
imported tokenizer's are read from its tokenizer.json. llama.cpp applies no normalizer, so an NFC
one (Qwen2) is written as llama.cpp's own converter writes it: text already in NFC, as nearly all
text is, gets the same ids. Llama-3 RoPE scaling goes in as the `rope_freqs` tensor of per-frequency
divisors llama.cpp reads. The model's chat format
(`slmkit.chat.ChatFormat.for_model`: the template it was tuned with, else ChatML when the tokenizer
has its tokens) goes in as `tokenizer.chat_template`, with the token that ends its assistant turns as
the end-of-turn id; `write_modelfile` writes the Ollama Modelfile in the same format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from slmkit.chat import ChatFormat
from slmkit.chat.ollama import ollama_template
from slmkit.config import ModelConfig
from slmkit.convert.gguf_vocab import PRE_TOKENIZERS as LLAMA_CPP_REGEXES
from slmkit.errors import ExportError, InputError, MissingExtraError, OutputExistsError
from slmkit.model.io import generation_defaults, load
from slmkit.model.layers import rope_frequencies
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.hf_backend import HFTokenizer
from slmkit.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, token_to_str

GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
QWEN2_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
# The regexes each llama.cpp pre-tokenizer splits with, in order (src/llama-vocab.cpp), as tokenizer.json writes them.
PRE_TOKENIZERS = {(GPT4_PATTERN,): "llama-bpe", (QWEN2_PATTERN,): "qwen2", (r"\p{N}", GPT2_PATTERN): "smollm",
                  (GPT2_PATTERN,): "gpt-2"}
# A tokenizer imported from a GGUF file splits with llama.cpp's own spelling of them: GPT-2's regex
# without the final `|\s+`, which only catches text no other branch matches, and a Split step (HF
# tokenizers) or llama.cpp keeps such text as a piece of its own anyway.
PRE_TOKENIZERS |= {LLAMA_CPP_REGEXES[name].regexes: name for name in ("llama-bpe", "qwen2", "smollm", "gpt-2")}


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("gguf", "gguf") from None
    return gguf


# ---------------------------------------------------------------------------- what GGUF can express
def gguf_architecture(cfg: ModelConfig) -> str:
    """`llama` or `gpt2` for a config llama.cpp can run exactly; otherwise an ExportError naming
    the first feature that has no GGUF equivalent."""
    unsupported = [
        (not cfg.causal, "a bidirectional encoder (causal: false)"),
        (cfg.qk_norm, "qk_norm"),
        (cfg.logit_softcap, "logit_softcap"),
        (cfg.embed_scale, "embed_scale"),
        (cfg.norm_plus_one, "norm_plus_one (Gemma-style RMSNorm)"),
        (cfg.lm_head_bias, "lm_head_bias"),
        (cfg.pos in ("alibi", "sinusoidal", "none"), f"{cfg.pos} positions"),
    ]
    if cfg.pos == "rope":
        kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type"))
        unsupported += [
            (cfg.norm != "rmsnorm", f"{cfg.norm} in a llama-style (rope) model"),
            (cfg.mlp != "swiglu", f"{cfg.mlp} MLP in a llama-style (rope) model"),
            (kind not in (None, "default", "linear", "llama3"), f"{kind} rope scaling"),
        ]
    elif cfg.pos == "learned":
        unsupported += [
            (cfg.norm != "layernorm", f"{cfg.norm} in a gpt2-style (learned positions) model"),
            (cfg.mlp != "gelu_tanh", f"{cfg.mlp} MLP in a gpt2-style (learned positions) model (llama.cpp's gpt2 uses tanh GELU)"),
            (cfg.n_heads * cfg.head_dim != cfg.d_model, "head_dim * n_heads != d_model in a gpt2-style model"),
        ]
    for bad, feature in unsupported:
        if bad:
            raise ExportError(f"GGUF cannot express {feature}; llama.cpp runs llama-style (rope, rmsnorm, swiglu) and gpt2-style models")
    return "llama" if cfg.pos == "rope" else "gpt2"


def pre_tokenizer(tokenizer: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer that splits text with exactly this tokenizer's regexes."""
    if isinstance(tokenizer, HFTokenizer):
        spec = json.loads(tokenizer.source_json)
        regexes = split_regexes(spec.get("pre_tokenizer"))
        normalizer = (spec.get("normalizer") or {}).get("type")
    else:
        regexes, normalizer = (tokenizer.pattern,), tokenizer.normalizer
    if regexes not in PRE_TOKENIZERS:
        known = ", ".join(dict.fromkeys(PRE_TOKENIZERS.values()))
        raise ExportError(f"GGUF needs a pre-tokenizer llama.cpp knows ({known}); this tokenizer splits text with "
                          f"other regexes: {' then '.join(regexes) or 'none'}")
    if normalizer not in (None, "nfc", "NFC"):
        raise ExportError(f"GGUF cannot express the tokenizer's {normalizer} normalizer (llama.cpp applies none)")
    return PRE_TOKENIZERS[regexes]


def split_regexes(step: dict[str, Any] | None) -> tuple[str, ...]:
    """The regexes a tokenizer.json pre-tokenizer splits with, in order (byte-level BPE steps only);
    an ExportError for any other step, which llama.cpp could not reproduce."""
    if step is None:
        return ()
    kind = step.get("type")
    if kind == "Sequence":
        return tuple(r for inner in step["pretokenizers"] for r in split_regexes(inner))
    if kind == "ByteLevel" and not step.get("add_prefix_space"):
        return (GPT2_PATTERN,) if step.get("use_regex", True) else ()
    if kind == "Split" and "Regex" in step.get("pattern", {}) and step.get("behavior") == "Isolated" and not step.get("invert"):
        return (step["pattern"]["Regex"],)
    if kind == "Digits":
        return (r"\p{N}" if step.get("individual_digits") else r"\p{N}+",)
    raise ExportError(f"GGUF cannot express the tokenizer's {kind} pre-tokenizer step ({json.dumps(step)[:120]})")


# ---------------------------------------------------------------------------- tensors
def permute_for_llama_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rope rows (i, i + d/2) -> llama.cpp adjacent pairs (2i, 2i + 1), per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    cfg, sd = model.cfg, model.state_dict()
    yield "token_embd.weight", sd["embed_tokens.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.n_layers):
        for kind in ("weight", "bias"):
            for src, heads, dst in (("q_proj", cfg.n_heads, "attn_q"), ("k_proj", cfg.n_kv_heads, "attn_k")):
                if (key := f"layers.{i}.self_attn.{src}.{kind}") in sd:
                    yield f"blk.{i}.{dst}.{kind}", permute_for_llama_rope(sd[key], heads)
            for src, dst in names.items():
                if (key := f"layers.{i}.{src}.{kind}") in sd:
                    yield f"blk.{i}.{dst}.{kind}", sd[key]
    yield "output_norm.weight", sd["norm.weight"]
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when output is absent
        yield "output.weight", sd["lm_head.weight"]
    if (factors := rope_freq_factors(cfg)) is not None:
        yield "rope_freqs.weight", factors


def gpt2_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    cfg, sd = model.cfg, model.state_dict()

    def bias(key: str, size: int) -> torch.Tensor:
        return sd.get(key, torch.zeros(size))

    yield "token_embd.weight", sd["embed_tokens.weight"]
    yield "position_embd.weight", sd["pos.wpe.weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        for src, dst in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            yield f"blk.{i}.{dst}.weight", sd[p + src + ".weight"]
            yield f"blk.{i}.{dst}.bias", bias(p + src + ".bias", cfg.d_model)
        qkv = [p + f"self_attn.{n}_proj" for n in "qkv"]
        yield f"blk.{i}.attn_qkv.weight", torch.cat([sd[n + ".weight"] for n in qkv])
        yield f"blk.{i}.attn_qkv.bias", torch.cat([bias(n + ".bias", sd[n + ".weight"].shape[0]) for n in qkv])
        for src, dst, size in (("self_attn.o_proj", "attn_output", cfg.d_model), ("mlp.up_proj", "ffn_up", cfg.ffn_hidden),
                               ("mlp.down_proj", "ffn_down", cfg.d_model)):
            yield f"blk.{i}.{dst}.weight", sd[p + src + ".weight"]
            yield f"blk.{i}.{dst}.bias", bias(p + src + ".bias", size)
    yield "output_norm.weight", sd["norm.weight"]
    yield "output_norm.bias", bias("norm.bias", cfg.d_model)
    if not cfg.tie_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def encode_tensor(gguf, name: str, w: torch.Tensor, kind: GGUFType) -> tuple[np.ndarray, object]:
    """A tensor in the file's type. Norms and biases stay f32 (as llama.cpp's converter keeps
    them); in q4_0 files the embeddings and output stay q8_0, as llama-quantize keeps them at
    higher precision; rows whose length is not a multiple of the block fall back to f16."""
    data = np.ascontiguousarray(w.detach().float().cpu().numpy())
    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or kind == "f32" or name == "position_embd.weight" and kind != "f16":
        return data, Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    if qtype == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    if qtype != Q.F16 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    if qtype == Q.F16:
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------------------- metadata
def vocabulary(tokenizer: Tokenizer) -> tuple[dict[int, str], list[str]]:
    """(id -> token string, merges as "left right") in the byte-level form GGUF stores: an imported
    tokenizer's straight from its tokenizer.json, slmkit's own from its byte tokens."""
    if not isinstance(tokenizer, HFTokenizer):
        pieces = {i: token_to_str(token) for i, token in enumerate(tokenizer.vocab)}
        return pieces, [f"{token_to_str(tokenizer.vocab[a])} {token_to_str(tokenizer.vocab[b])}" for a, b in tokenizer.merges]
    model = json.loads(tokenizer.source_json)["model"]
    if model.get("type") != "BPE" or not _byte_level(tokenizer):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style); "
                          f"this one is {model.get('type')} without byte-level pre-tokenization")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {i: piece for piece, i in model["vocab"].items()}, merges


def _byte_level(tokenizer: HFTokenizer) -> bool:
    spec = json.loads(tokenizer.source_json)
    return '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) and '"ByteLevel"' in json.dumps(spec.get("decoder"))


def adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by default, as an imported Llama 3's post-processor does."""
    if not isinstance(tokenizer, HFTokenizer) or tokenizer.bos_token is None:
        return False
    return tokenizer.encode_with_template("a")[:1] == [tokenizer.hf.token_to_id(tokenizer.bos_token)]


def add_tokenizer(gguf, writer, tokenizer: Tokenizer, vocab_size: int, chat_format: ChatFormat | None = None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    pieces, merges = vocabulary(tokenizer)
    tokens, types = [], []
    specials, added = {v: k for k, v in tokenizer.special_tokens.items()}, {v: k for k, v in tokenizer.added_tokens.items()}
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i]), types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(added[i]), types.append(gguf.TokenType.USER_DEFINED)
        elif i in pieces:
            tokens.append(pieces[i]), types.append(gguf.TokenType.NORMAL)
        else:  # the model's embedding table may be padded beyond the tokenizer
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    known = {**tokenizer.special_tokens, **tokenizer.added_tokens}
    bos = known.get(tokenizer.bos_token) if tokenizer.bos_token else None
    if tokenizer.eot_token:
        writer.add_eos_token_id(tokenizer.eot_id)
    if bos is not None or tokenizer.eot_token:
        writer.add_bos_token_id(bos if bos is not None else tokenizer.eot_id)  # GPT-2 convention: eot, never added
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(adds_bos(tokenizer))  # llama.cpp would otherwise add one for llama-bpe
    writer.add_add_eos_token(False)
    if chat_format is not None:
        writer.add_chat_template(chat_format.source)
        if chat_format.stop_tokens:  # llama.cpp ends a turn at eos or eot
            writer.add_eot_token_id(chat_format.stop_tokens[0])


def add_hyperparameters(gguf, writer, cfg: ModelConfig, arch: str) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_hidden)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if cfg.rope_scaling and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor | None:
    """Llama-3 RoPE scaling as llama.cpp reads it: one divisor per frequency (the `rope_freqs`
    tensor), the unscaled inverse frequencies over the scaled ones. None for other scalings."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("type", scaling.get("rope_type")) != "llama3":
        return None
    return rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)) / rope_frequencies(cfg)


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    type: GGUFType = "f16",
    modelfile: bool = False,
    force: bool = False,
) -> Path:
    """Write a model directory as one GGUF file (and an Ollama Modelfile beside it); returns the
    GGUF path. The file appears only when complete."""
    gguf = _import_gguf()
    if type not in GGUF_TYPES:
        raise InputError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    model, tokenizer = load(model_dir)
    arch = gguf_architecture(model.cfg)
    pre_tokenizer(tokenizer), vocabulary(tokenizer)  # refuse before writing anything
    chat_format = ChatFormat.for_model(model_dir, tokenizer)
    if modelfile and chat_format:
        ollama_template(chat_format)  # refuses a template Ollama cannot express
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(model_dir).resolve().name)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(gguf, writer, model.cfg, arch)
        add_tokenizer(gguf, writer, tokenizer, model.cfg.vocab_size, chat_format)
        tensors = llama_tensors(model) if arch == "llama" else gpt2_tensors(model)
        for name, w in tensors:
            data, qtype = encode_tensor(gguf, name, w, type)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; llama.cpp / Ollama may run as another user
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if modelfile:
        write_modelfile(out, tokenizer, generation_defaults(model_dir), model.cfg.context_length, chat_format)
    return out


def write_modelfile(gguf_path: str | os.PathLike, tokenizer: Tokenizer, generation: dict | None = None,
                    context_length: int | None = None, chat_format: ChatFormat | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF file (FROM, TEMPLATE, stop and sampling PARAMETERs),
    so that `ollama create NAME -f Modelfile` works from that directory without edits. The
    TEMPLATE and stops are `chat_format`'s."""
    from slmkit._io import write_text_atomic

    gguf_path = Path(gguf_path)
    generation = generation or {}
    lines = [f"FROM ./{gguf_path.name}", ""]
    template = "{{ .Prompt }}"
    if chat_format is not None:
        template = ollama_template(chat_format)
        stops = [tokenizer.decode([t]) for t in chat_format.stop_tokens]
    else:
        stops = [t for t in generation.get("stop_tokens") or [] if isinstance(t, str)]
        stops += [tokenizer.eot_token] if tokenizer.eot_token else []
    lines += [f'TEMPLATE """{template}"""', ""]
    for stop in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{stop}"')
    for key, name in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"),
                      ("repetition_penalty", "repeat_penalty")):
        if generation.get(key) is not None:
            lines.append(f"PARAMETER {name} {generation[key]}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    path = gguf_path.with_name("Modelfile")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
