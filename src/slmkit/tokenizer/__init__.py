"""Byte-level BPE: training, encoding (reference and fast), and HF-format files."""

from slmkit.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from slmkit.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, EOT, PAD, Tokenizer
from slmkit.tokenizer.train import train_bpe

__all__ = ["Tokenizer", "train_bpe", "DEFAULT_SPECIAL_TOKENS", "EOT", "PAD", "PATTERNS", "GPT2_PATTERN", "GPT4_PATTERN"]
