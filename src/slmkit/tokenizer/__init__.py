"""Byte-level BPE: training, encoding (reference and fast), and HF-format files."""

from slmkit.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from slmkit.tokenizer.tokenizer import DEFAULT_SPECIAL_TOKENS, EOT, PAD, Tokenizer
from slmkit.tokenizer.train import train_bpe

__all__ = ["DEFAULT_SPECIAL_TOKENS", "EOT", "GPT2_PATTERN", "GPT4_PATTERN", "PAD", "PATTERNS", "Tokenizer", "train_bpe"]
