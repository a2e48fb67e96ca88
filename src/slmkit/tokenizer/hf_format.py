"""Tokenizer files in the Hugging Face formats.

Writes `tokenizer.json` as `tokenizers` itself would for a byte-level BPE (a Split pre-tokenizer
with the pattern, then ByteLevel without its own regex), so that `Tokenizer.from_file` loads it
and gives the same ids. Reads that layout, GPT-2's plain ByteLevel layout, Qwen2's NFC
normalizer, and GPT-2-style `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmkit._io import write_json
from slmkit.errors import InputError, TokenizerError
from slmkit.tokenizer.pretokenize import GPT2_PATTERN, str_to_token, token_to_str
from slmkit.tokenizer.tokenizer import EOT, PAD, Backend, Tokenizer

HF_BACKEND_KEY = "slmkit_tokenizer_backend"  # in tokenizer_config.json: "hf" for imported tokenizers


def to_hf_json(tok: Tokenizer) -> dict[str, Any]:
    extra = {**tok.added_tokens, **tok.special_tokens}
    added = [
        {
            "id": token_id,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": content in tok.special_tokens,
        }
        for content, token_id in sorted(extra.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if tok.normalizer == "nfc" else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": tok.ignore_merges,
            "vocab": {token_to_str(tok.vocab[i]): i for i in tok.mergeable},
            "merges": [[token_to_str(tok.vocab[a]), token_to_str(tok.vocab[b])] for a, b in tok.merges],
        },
    }


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "tokenizer.json", to_hf_json(tok))
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tok.eot_token,
            "pad_token": tok.pad_token,
            "bos_token": None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            **({"chat_template": tok.chat_template} if tok.chat_template else {}),
        },
    )
    return directory


def load_tokenizer(path: str | os.PathLike, backend: Backend | None = None) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise InputError(f"tokenizer path {path} does not exist")
    if backend == "hf" or (backend is None and runs_on_hf(path)):
        from slmkit.tokenizer.hf_backend import HFTokenizer

        return HFTokenizer.load_dir(path if path.is_dir() else path.parent)
    backend = backend or "fast"
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", backend)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return _from_vocab_merges(path / "vocab.json", path / "merges.txt", backend)
        raise InputError(f"{path} holds neither tokenizer.json nor vocab.json + merges.txt")
    return _from_tokenizer_json(path, backend)


def runs_on_hf(path: Path) -> bool:
    """Whether the tokenizer at `path` was imported with a model and runs on the HF library."""
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    return config.is_file() and _read_json(config).get(HF_BACKEND_KEY) == "hf"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def _special_names(directory: Path, specials: dict[str, int]) -> tuple[str | None, str | None]:
    """The end-of-text and pad tokens: from tokenizer_config.json when present, else by convention."""
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}

    def name(key: str, default: str | None) -> str | None:
        value = config.get(key, default)
        if isinstance(value, dict):  # older transformers write {"content": ...}
            value = value.get("content")
        return value if value in specials else None

    return name("eos_token", EOT), name("pad_token", PAD)


def _pattern_of(pre: dict | None, where: Path) -> str:
    """The split regex of a byte-level pre-tokenizer, or an error naming what is unsupported."""
    if pre is None:
        raise TokenizerError(f"{where}: no pre_tokenizer; only byte-level BPE tokenizers are supported")
    steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    pattern = None
    for step in steps:
        kind = step["type"]
        if kind == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise TokenizerError(f"{where}: Split pre-tokenizer with behavior {step.get('behavior')} is not supported")
            regex_ = step["pattern"].get("Regex")
            if regex_ is None:
                raise TokenizerError(f"{where}: Split on a plain string is not supported, only on a Regex")
            pattern = regex_
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise TokenizerError(f"{where}: ByteLevel with add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise TokenizerError(f"{where}: a Split followed by a regex ByteLevel split is not supported")
                pattern = GPT2_PATTERN
        else:
            raise TokenizerError(f"{where}: pre-tokenizer {kind!r} is not supported (byte-level BPE only)")
    if pattern is None:
        raise TokenizerError(f"{where}: pre-tokenizer has no split pattern")
    return pattern


def _normalizer_of(norm: dict | None, where: Path) -> str | None:
    if norm is None:
        return None
    if norm["type"] == "NFC":
        return "nfc"
    if norm["type"] == "Sequence" and not norm["normalizers"]:
        return None
    raise TokenizerError(f"{where}: normalizer {norm['type']!r} is not supported (NFC or none)")


def _build(
    vocab_map: dict[str, int],
    merges: list[tuple[str, str]],
    added: list[dict],
    pattern: str,
    directory: Path,
    backend: Backend,
    **options: Any,
) -> Tokenizer:
    size = max([*vocab_map.values(), *(t["id"] for t in added)]) + 1
    vocab: list[bytes | None] = [None] * size
    for piece, token_id in vocab_map.items():
        vocab[token_id] = str_to_token(piece)
    specials, domain = {}, {}
    for token in added:
        vocab[token["id"]] = token["content"].encode("utf-8")
        (specials if token["special"] else domain)[token["content"]] = token["id"]
    if None in vocab:
        raise TokenizerError(f"{directory}: token ids are not contiguous (id {vocab.index(None)} is missing)")
    try:
        merge_ids = [(vocab_map[a], vocab_map[b]) for a, b in merges]
    except KeyError as e:
        raise TokenizerError(f"{directory}: merge uses {e.args[0]!r}, which is not in the vocabulary") from None
    eot, pad = _special_names(directory, specials)
    tok = Tokenizer(vocab, merge_ids, pattern, specials, domain, eot_token=eot, pad_token=pad, backend=backend, **options)
    tok.chat_template = chat_template_of(directory)
    return tok


def chat_template_of(directory: Path) -> str | None:
    """The default chat template: `chat_template.jinja`, else tokenizer_config.json's `chat_template`
    (a string, or a list of named templates of which "default" is used)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    template = _read_json(config_path).get("chat_template") if config_path.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _from_tokenizer_json(path: Path, backend: Backend) -> Tokenizer:
    data = _read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r} is not supported (byte-level BPE only)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: SentencePiece-style BPE options are not supported (byte-level BPE only)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return _build(
        model["vocab"],
        merges,
        data.get("added_tokens", []),
        _pattern_of(data.get("pre_tokenizer"), path),
        path.parent,
        backend,
        normalizer=_normalizer_of(data.get("normalizer"), path),
        ignore_merges=bool(model.get("ignore_merges", False)),
    )


def _from_vocab_merges(vocab_path: Path, merges_path: Path, backend: Backend) -> Tokenizer:
    vocab_map = _read_json(vocab_path)
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    # GPT-2 keeps <|endoftext|> inside vocab.json; treat it as the special token it is.
    added = [{"id": vocab_map.pop(EOT), "content": EOT, "special": True}] if EOT in vocab_map else []
    return _build(vocab_map, merges, added, GPT2_PATTERN, vocab_path.parent, backend)
