"""The tokenizer of a GGUF file (`tokenizer.ggml.*`) as a Hugging Face `tokenizer.json`.

llama.cpp names the pre-tokenizer of a byte-level BPE vocabulary (`tokenizer.ggml.pre`) and keeps
its split regexes in its own source (`src/llama-vocab.cpp`): a list applied one after another,
each splitting the pieces of the previous one. A `Sequence` of `Split(..., "Isolated")` steps is
the same operation in `tokenizers`, so the regexes below are llama.cpp's, verbatim, and the ids
are llama.cpp's. SentencePiece vocabularies (`tokenizer.ggml.model = llama`: Llama 2, TinyLlama,
Gemma) become BPE with byte fallback, with merges ranked by the merged piece's score, which is how
llama.cpp's SPM tokenizer picks the next merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmkit.errors import InputError

# llama.cpp's split regexes (llm_tokenizer_bpe), by the pre-tokenizer type that uses them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a token is that token, whatever the merges say
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token key


_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), PreTokenizer((_QWEN2,))),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), PreTokenizer((_GPT2,))),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    PreTokenizer(_DIGITS_THEN_GPT2)),
}
# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"


@dataclass
class GGUFVocab:
    """What the model directory needs: tokenizer.json, and tokenizer_config.json's entries."""

    tokenizer_json: dict[str, Any]
    config: dict[str, Any]


def vocab_from_gguf(kv: dict[str, Any], context_length: int) -> GGUFVocab:
    """Build the tokenizer of the GGUF metadata `kv` (key -> value)."""
    model = kv.get("tokenizer.ggml.model")
    tokens = kv.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise InputError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = list(kv.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if model == "gpt2":
        add_bos, body = _byte_level_bpe(kv, tokens, types)
    elif model == "llama":
        add_bos, body = True, _sentencepiece_bpe(kv, tokens, types)
    else:
        raise InputError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 (byte-level BPE), "
                         "llama (SentencePiece))")
    add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(kv.get("tokenizer.ggml.add_eos_token", False))
    names = {role: _token(kv, tokens, key) for role, key in
             (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
              ("unk_token", "unknown_token_id"))}
    for flag, role in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and names[role] is None:
            raise InputError(f"the GGUF file asks to add a {role[:3].upper()} token but names none (tokenizer.ggml.{role[:3]}_token_id)")
    body["added_tokens"] = _added_tokens(tokens, types)
    body["post_processor"] = _post_processor(kv, names, add_bos, add_eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if kv.get("tokenizer.chat_template"):
        config["chat_template"] = kv["tokenizer.chat_template"]
    return GGUFVocab({"version": "1.0", "truncation": None, "padding": None, **body}, config)


def _byte_level_bpe(kv: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[bool, dict[str, Any]]:
    name = kv.get("tokenizer.ggml.pre", "default")
    if name not in PRE_TOKENIZERS:
        raise InputError(f"unsupported GGUF pre-tokenizer {name!r} (tokenizer.ggml.pre); supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    pre = PRE_TOKENIZERS[name]
    merges = kv.get("tokenizer.ggml.merges")
    if merges is None:
        raise InputError("the GGUF file's BPE tokenizer has no merges (tokenizer.ggml.merges)")
    body = {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in pre.regexes),
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre.ignore_merges,
            "vocab": _vocab(tokens), "merges": [m.split(" ", 1) for m in merges],
        },
    }
    return pre.add_bos, body


def _sentencepiece_bpe(kv: dict[str, Any], tokens: list[str], types: list[int]) -> dict[str, Any]:
    """SentencePiece as tokenizers runs Llama 2 and Gemma: spaces as U+2581 (and one in front when
    `add_space_prefix`), BPE merges over the whole text, unknown characters as <0xXX> byte tokens."""
    scores = kv.get("tokenizer.ggml.scores")
    if scores is None:
        raise InputError("the GGUF file's SentencePiece tokenizer has no scores (tokenizer.ggml.scores)")
    prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    vocab = _vocab(tokens)
    mergeable = {t: i for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[i], mergeable[left], mergeable[right], left, right))
    merges.sort()
    unk = _token(kv, tokens, "unknown_token_id")
    normalizers = [{"type": "Prepend", "prepend": SPIECE_SPACE}] if prefix else []
    decoders = [{"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": {"type": "Sequence", "normalizers": [
            *normalizers, {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE}]},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": [[left, right] for *_, left, right in merges],
        },
    }


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    return vocab


def _token(kv: dict[str, Any], tokens: list[str], key: str) -> str | None:
    i = kv.get(f"tokenizer.ggml.{key}")
    if i is None:
        return None
    if not 0 <= i < len(tokens):
        raise InputError(f"tokenizer.ggml.{key} = {i} is outside the vocabulary (size {len(tokens)})")
    return tokens[i]


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Control tokens are special (matched in text only when asked, as llama.cpp's `special`);
    user-defined ones are always matched, as llama.cpp does."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": kind in (CONTROL, UNKNOWN)}
            for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, UNKNOWN, USER_DEFINED)]


def _post_processor(kv: dict[str, Any], names: dict[str, str | None], add_bos: bool,
                    add_eos: bool) -> dict[str, Any] | None:
    """BOS/EOS around each text as the file's add_bos/add_eos flags say (transformers' default
    `add_special_tokens=True` then gives llama.cpp's `add_special=True` ids)."""
    if not (add_bos or add_eos):
        return None
    ends = [(names["bos_token"], kv["tokenizer.ggml.bos_token_id"])] if add_bos else []
    tail = [(names["eos_token"], kv["tokenizer.ggml.eos_token_id"])] if add_eos else []

    def template(*middle: str) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": t, "type_id": 0}} for t, _ in ends]
                + [{"Sequence": {"id": m, "type_id": 0}} for m in middle]
                + [{"SpecialToken": {"id": t, "type_id": 0}} for t, _ in tail])

    return {
        "type": "TemplateProcessing",
        "single": template("A"),
        "pair": template("A", "B"),
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in [*ends, *tail]},
    }
