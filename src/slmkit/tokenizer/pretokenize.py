"""Pre-tokenization: the regex that cuts text into chunks BPE never merges across.

Both patterns are exactly the ones the wider ecosystem recognizes: `gpt2` is GPT-2's split
(HF ByteLevel's built-in regex, llama.cpp's `gpt-2`), `gpt4` is the GPT-4-style split as
published with Llama 3 (llama.cpp's `llama-bpe`). Keeping them byte-identical is what lets
an slmkit tokenizer run unchanged in `tokenizers`, tiktoken and llama.cpp.
"""

from __future__ import annotations

from functools import lru_cache

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}


def resolve_pattern(name_or_regex: str) -> str:
    """A pattern name (`gpt4`, `gpt2`) or a literal regex -> the regex."""
    return PATTERNS.get(name_or_regex, name_or_regex)


@lru_cache(maxsize=16)
def compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE files.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to U+0100 and up,
    so that every token of a vocabulary file is a visible, whitespace-free string.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """Bytes of a token -> its byte-level string as written in vocab.json / tokenizer.json."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Inverse of `token_to_str`."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in text)
