"""Imported tokenizers, run by the Hugging Face `tokenizers` library behind slmkit's interface.

A model imported from the Hub brings its own `tokenizer.json`: byte-level BPE (GPT-2, Llama 3,
Qwen), SentencePiece-style BPE with byte fallback (Llama 2, Gemma), normalizers, added tokens
with strip rules, post-processors. The library that defined those files is the one that runs them,
so the ids are exactly what transformers produces. The files are kept verbatim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from slmkit._io import write_json, write_text_atomic
from slmkit.errors import InputError, MissingExtraError, TokenizerError
from slmkit.tokenizer.hf_format import HF_BACKEND_KEY, chat_template_of
from slmkit.tokenizer.pretokenize import str_to_token
from slmkit.tokenizer.tokenizer import Backend, Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_name(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """`Tokenizer` whose encoding and decoding are done by `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any] | None = None) -> None:
        try:
            import tokenizers
        except ImportError:
            raise MissingExtraError("tokenizers", "hf") from None
        try:
            self.hf = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on malformed files
            raise TokenizerError(f"tokenizer.json cannot be loaded by the tokenizers library: {e}") from None
        self.source_json = tokenizer_json
        self.config = {k: v for k, v in (config or {}).items() if k != HF_BACKEND_KEY}
        added = self.hf.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self.added_tokens = {t.content: i for i, t in added.items() if not t.special}
        known = {**self.special_tokens, **self.added_tokens}

        def name(key: str) -> str | None:
            value = _token_name(self.config.get(key))
            return value if value in known else None

        self.eot_token, self.pad_token, self.bos_token = name("eos_token"), name("pad_token"), name("bos_token")
        self.chat_template = self.config.get("chat_template")
        self.backend = "hf"
        self.normalizer = None  # the library applies the file's own normalizer
        self._matchers = {}
        self.encoder = _LibraryEncoder(self.hf)

    @classmethod
    def load_dir(cls, directory: Path) -> HFTokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{directory} has no tokenizer.json")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        config["chat_template"] = chat_template_of(directory)
        return cls(path.read_text(encoding="utf-8"), config)

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return max(self.hf.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def eot_id(self) -> int:
        if self.eot_token is None:
            raise TokenizerError("this tokenizer has no end-of-text token (tokenizer_config.json has no eos_token)")
        return self.hf.token_to_id(self.eot_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.hf.token_to_id(self.pad_token)

    def with_backend(self, backend: Backend) -> Tokenizer:
        if backend != "hf":
            raise TokenizerError(f"an imported tokenizer runs only on the hf backend, not {backend!r}")
        return self

    # ----------------------------------------------------------------- encoding
    def _encode_checked(self, texts: list[str], allowed: frozenset[str], num_threads: int | None) -> list[list[int]]:
        if not allowed:
            return self.encoder.encode_ordinary_batch(texts, num_threads)
        if allowed == set(self.special_tokens):  # the library's own rule: every special token matches
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return super()._encode_checked(texts, allowed, num_threads)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoder.encode_ordinary_batch([self._prepare(text)])[0]

    def encode_with_template(self, text: str) -> list[int]:
        """Ids as transformers gives them by default: with the post-processor's tokens (e.g. BOS)."""
        return self.hf.encode(self._prepare(text), add_special_tokens=True).ids

    def vocab_piece(self, token_id: int) -> str:
        self.decode_bytes([token_id])  # the same range check as slmkit's own tokenizer
        return self.hf.id_to_token(token_id)

    # ----------------------------------------------------------------- decoding
    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """The bytes each token stands for, so streamed text can be decoded token by token."""
        decoder = json.loads(self.source_json).get("decoder") or {}
        steps = decoder.get("decoders", [decoder])
        byte_level = any(step.get("type") == "ByteLevel" for step in steps)
        added = {i for i in (*self.special_tokens.values(), *self.added_tokens.values())}
        out = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i)
            if piece is None:
                out.append(b"")
            elif i in added:
                out.append(piece.encode("utf-8"))
            elif byte_level:
                out.append(str_to_token(piece))
            elif m := _BYTE_FALLBACK.fullmatch(piece):
                out.append(bytes([int(m.group(1), 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out

    def decode_bytes(self, ids: list[int]) -> bytes:
        table = self._token_bytes
        try:
            return b"".join(table[i] for i in ids)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < len(table))
            raise TokenizerError(f"token id {bad!r} is outside the vocabulary (size {len(table)})") from None

    def decode(self, ids: list[int]) -> str:
        self.decode_bytes(ids)  # the same range check as slmkit's own tokenizer
        return self.hf.decode(list(ids), skip_special_tokens=False)

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> Path:
        """The source tokenizer.json verbatim, and its tokenizer_config.json marked for this backend."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "tokenizer.json", self.source_json)
        config = {k: v for k, v in self.config.items() if v is not None or k != "chat_template"}
        write_json(directory / "tokenizer_config.json", {**config, HF_BACKEND_KEY: "hf"})
        return directory

    def to_hf_json(self) -> dict:
        return json.loads(self.source_json)

    @cached_property
    def _fingerprint(self) -> str:
        canonical = json.dumps(self.to_hf_json(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, special={len(self.special_tokens)}, added={len(self.added_tokens)})"


class _LibraryEncoder:
    """Ordinary encoding through the library: special-token strings are read as plain text."""

    def __init__(self, hf) -> None:
        self.hf = hf

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        self.hf.encode_special_tokens = True
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.hf.encode_special_tokens = False

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode_ordinary_batch([text])[0]
