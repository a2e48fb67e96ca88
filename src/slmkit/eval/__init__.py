"""Evaluation: perplexity and bits-per-byte."""

from slmkit.eval.perplexity import PerplexityResult, perplexity, perplexity_of_texts

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_texts"]
