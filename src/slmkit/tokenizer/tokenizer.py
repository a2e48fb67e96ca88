"""The slmkit tokenizer: byte-level BPE with special and domain tokens.

Ids are laid out as: token ids of the BPE vocabulary (bytes and merges), domain tokens
(added tokens that are matched before pre-tokenization, so a domain term is always one token),
then special tokens (`<|endoftext|>`, `<|pad|>`, chat markers), which ordinary text never
produces unless the caller allows them.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Collection, Iterator
from functools import cached_property
from pathlib import Path
from typing import Literal

import regex

from slmkit.chat.templates import CHATML_TOKENS
from slmkit.errors import TokenizerError
from slmkit.tokenizer.fast import FastEncoder
from slmkit.tokenizer.reference import ReferenceEncoder

EOT = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = (EOT, PAD, *CHATML_TOKENS)

Backend = Literal["fast", "reference", "hf"]
AllowedSpecial = Literal["all"] | Collection[str]


def utf8_safe(text: str) -> str:
    """Explicit policy for Python strings holding surrogate code points (not encodable as UTF-8):
    a valid high+low pair becomes the character it encodes, a lone surrogate becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """Encode text to ids and back. Build one with `train_bpe` or `Tokenizer.load(dir)`."""

    chat_template: str | None = None  # Jinja template of chat prompts, from tokenizer_config.json
    bos_token: str | None = None  # beginning-of-text token that chat templates may use

    def __init__(
        self,
        vocab: list[bytes],
        merges: list[tuple[int, int]],
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        added_tokens: dict[str, int] | None = None,
        *,
        normalizer: Literal["nfc"] | None = None,
        ignore_merges: bool = False,
        eot_token: str | None = EOT,
        pad_token: str | None = PAD,
        backend: Backend = "fast",
    ) -> None:
        self.vocab = vocab
        self.merges = merges
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.added_tokens = dict(added_tokens or {})
        self.normalizer = normalizer
        self.ignore_merges = ignore_merges
        self.eot_token = eot_token if eot_token in self.special_tokens else None
        self.pad_token = pad_token if pad_token in self.special_tokens else None
        self.backend = backend
        self._matchers: dict[frozenset[str], regex.Pattern] = {}

        extra_ids = {*self.added_tokens.values(), *self.special_tokens.values()}
        self.mergeable = [i for i in range(len(vocab)) if i not in extra_ids]
        token_ids = {vocab[i]: i for i in self.mergeable}
        missing = [b for b in range(256) if bytes([b]) not in token_ids]
        if missing:
            raise TokenizerError(
                f"vocabulary has no token for {len(missing)} byte value(s) (e.g. {missing[0]:#04x}); "
                "byte-level BPE needs all 256 so that any text can be encoded"
            )
        byte_ids = [token_ids[bytes([b])] for b in range(256)]
        merge_ids = {pair: token_ids[vocab[pair[0]] + vocab[pair[1]]] for pair in merges}
        self.encoder: FastEncoder | ReferenceEncoder = (
            FastEncoder(pattern, vocab, byte_ids, merge_ids, self.mergeable)
            if backend == "fast"
            else ReferenceEncoder(pattern, byte_ids, merge_ids, token_ids, ignore_merges)
        )

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eot_id(self) -> int:
        if self.eot_token is None:
            raise TokenizerError("this tokenizer has no end-of-text token")
        return self.special_tokens[self.eot_token]

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.special_tokens[self.pad_token]

    def with_backend(self, backend: Backend) -> Tokenizer:
        """The same tokenizer on another encoding backend (`fast` or `reference`)."""
        other = Tokenizer(
            self.vocab, self.merges, self.pattern, self.special_tokens, self.added_tokens,
            normalizer=self.normalizer, ignore_merges=self.ignore_merges,
            eot_token=self.eot_token, pad_token=self.pad_token, backend=backend,
        )
        other.chat_template = self.chat_template
        return other

    # ----------------------------------------------------------------- encoding
    def encode(
        self,
        text: str,
        *,
        allowed_special: AllowedSpecial = (),
        disallowed_special: AllowedSpecial = "all",
    ) -> list[int]:
        """Text -> ids. Special-token strings in `text` raise unless allowed (then they become the
        special id) or removed from `disallowed_special` (then they are encoded as plain text)."""
        return self.encode_batch([text], allowed_special=allowed_special, disallowed_special=disallowed_special)[0]

    def encode_with_template(self, text: str) -> list[int]:
        """Ids as transformers gives them by default: special-token strings matched, and what the
        post-processor adds (nothing for slmkit's own tokenizers; an imported Llama 3's BOS)."""
        return self.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, with special-token strings encoded as ordinary text (never a special id)."""
        if not self.added_tokens:
            return self.encoder.encode_ordinary(self._prepare(text))
        return self.encode_batch([text], disallowed_special=())[0]

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """`encode_ordinary` over many texts, on all cores."""
        return self.encode_batch(texts, disallowed_special=(), num_threads=num_threads)

    def encode_batch(
        self,
        texts: list[str],
        *,
        allowed_special: AllowedSpecial = (),
        disallowed_special: AllowedSpecial = "all",
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """`encode` over many texts. The BPE work runs on all cores (tiktoken releases the GIL)."""
        allowed = frozenset(self._names(allowed_special))
        disallowed = frozenset(self._names(disallowed_special) - allowed)
        texts = [self._prepare(t) for t in texts]
        if disallowed:
            for text in texts:
                if found := self._matcher(disallowed).search(text):
                    raise TokenizerError(
                        f"text contains the special token {found.group()!r}; pass allowed_special={{{found.group()!r}}} "
                        "to encode it as that token, or disallowed_special=() to encode it as ordinary text"
                    )
        return self._encode_checked(texts, allowed, num_threads)

    def _encode_checked(self, texts: list[str], allowed: frozenset[str], num_threads: int | None) -> list[list[int]]:
        """Encode texts already checked for disallowed specials; `allowed` specials become their ids."""
        if not self.added_tokens and not allowed:
            return self.encoder.encode_ordinary_batch(texts, num_threads)
        pieces = [list(self._segments(t, allowed)) for t in texts]
        plain = [segment for segments in pieces for segment, token_id in segments if token_id is None]
        encoded = iter(self.encoder.encode_ordinary_batch(plain, num_threads))
        out = []
        for segments in pieces:
            ids: list[int] = []
            for _, token_id in segments:
                ids.extend(next(encoded) if token_id is None else (token_id,))
            out.append(ids)
        return out

    def _prepare(self, text: str) -> str:
        text = utf8_safe(text)
        return unicodedata.normalize("NFC", text) if self.normalizer == "nfc" else text

    def _names(self, spec: AllowedSpecial) -> set[str]:
        if spec == "all":
            return set(self.special_tokens)
        unknown = set(spec) - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"unknown special token(s) {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        return set(spec)

    def _matcher(self, names: frozenset[str]) -> regex.Pattern:
        if names not in self._matchers:
            # Longest first: at one position the longest token wins (HF's leftmost-longest rule).
            ordered = sorted(names, key=lambda s: (-len(s), s))
            self._matchers[names] = regex.compile("|".join(regex.escape(s) for s in ordered))
        return self._matchers[names]

    def _segments(self, text: str, allowed: frozenset[str]) -> Iterator[tuple[str, int | None]]:
        """Split out domain tokens and allowed specials: (text, None) or (token string, id)."""
        names = frozenset(self.added_tokens) | allowed
        if not names:
            yield text, None
            return
        start = 0
        for m in self._matcher(names).finditer(text):
            if m.start() > start:
                yield text[start : m.start()], None
            token = m.group()
            yield token, self.added_tokens.get(token, self.special_tokens.get(token))
            start = m.end()
        if start < len(text):
            yield text[start:], None

    # ----------------------------------------------------------------- chat
    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
        return_assistant_tokens_mask: bool = False, **variables
    ) -> str | list[int] | dict[str, list[int]]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the tokenizer's Jinja chat template
        (from tokenizer_config.json), in a sandbox; the text, or its ids when `tokenize` (message text
        never becomes special tokens). With `return_assistant_tokens_mask`, as transformers:
        {"input_ids", "assistant_masks"}, 1 on the ids inside `{% generation %}` blocks."""
        from slmkit.chat import encode_pieces, render_pieces

        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        specials = {"bos_token": self.bos_token, "eos_token": self.eot_token, "pad_token": self.pad_token}
        pieces = render_pieces(self.chat_template, messages, add_generation_prompt, **{**specials, **variables})
        if not tokenize:
            return "".join(p.text for p in pieces)
        encoded = encode_pieces(self, pieces)
        if return_assistant_tokens_mask:
            return {"input_ids": encoded.ids, "assistant_masks": [int(m) for m in encoded.assistant_mask]}
        return encoded.ids

    # ----------------------------------------------------------------- decoding
    def decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return b"".join(self.vocab[i] for i in ids)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or not 0 <= i < len(self.vocab))
            raise TokenizerError(f"token id {bad!r} is outside the vocabulary (size {len(self.vocab)})") from None

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; a sequence that ends inside a multi-byte character decodes it as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_piece(self, token_id: int) -> str:
        """A readable form of one token, for display."""
        return self.decode_bytes([token_id]).decode("utf-8", errors="backslashreplace")

    def vocab_piece(self, token_id: int) -> str:
        """The token as tokenizer.json spells it, as transformers' convert_ids_to_tokens gives it ('Ġthe')."""
        from slmkit.tokenizer.pretokenize import token_to_str

        names = {i: name for name, i in {**self.added_tokens, **self.special_tokens}.items()}
        return names[token_id] if token_id in names else token_to_str(self.decode_bytes([token_id]))

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (HF format) and `tokenizer_config.json` into `directory`."""
        from slmkit.tokenizer.hf_format import save_tokenizer

        return save_tokenizer(self, directory)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Backend | None = None) -> Tokenizer:
        """Load a directory or file: `tokenizer.json`, or GPT-2 style `vocab.json` + `merges.txt`.
        `backend` None: `hf` for tokenizers imported with a model (see `slmkit.convert`), else `fast`."""
        from slmkit.tokenizer.hf_format import load_tokenizer

        return load_tokenizer(path, backend=backend)

    def to_hf_json(self) -> dict:
        from slmkit.tokenizer.hf_format import to_hf_json

        return to_hf_json(self)

    @cached_property
    def _fingerprint(self) -> str:
        canonical = json.dumps(self.to_hf_json(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the ids (vocab, merges, pattern, specials)."""
        return self._fingerprint

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special={len(self.special_tokens)}, domain={len(self.added_tokens)}, backend={self.backend!r})"
        )
