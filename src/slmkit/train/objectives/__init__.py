"""Training objectives: each turns a batch of token windows into (inputs, targets) and a loss.

The objective follows the model: `causal: true` trains next-token prediction (`lm`),
`causal: false` trains masked-token prediction (`mlm`).
"""

from __future__ import annotations

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.tokenizer import Tokenizer
from slmkit.train.objectives.lm import LanguageModeling
from slmkit.train.objectives.mlm import MaskedLanguageModeling

Objective = LanguageModeling | MaskedLanguageModeling


def objective_for(cfg: ModelConfig, tokenizer: Tokenizer, seed: int) -> Objective:
    if cfg.causal:
        return LanguageModeling()
    if tokenizer.pad_id is None:
        raise InputError("masked-LM training replaces masked tokens with <|pad|>, but the tokenizer has none")
    return MaskedLanguageModeling(mask_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, seed=seed)


__all__ = ["LanguageModeling", "MaskedLanguageModeling", "Objective", "objective_for"]
