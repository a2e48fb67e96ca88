"""Training objectives: what the loss is, for pretraining and for every fine-tuning task.

The one training loop (`slmkit.train.loop`) asks every objective the same things:

    name, metric, higher_is_better       what validation reports and early stopping watches
    collate(examples) -> batch           tensors for one micro-batch; "targets" holds next tokens, if any
    loss(model, batch) -> StepLoss       the training loss, the floats to log beside it, and the
                                         training forward whose MoE/MTP terms the loop adds
    evaluate(model, examples) -> dict    validation metrics, `metric` among them
    state_dict(), load_state_dict(s)     optional: what must survive a resume (MLM's masking RNG)

Tasks that start from records also have `prepare(records) -> examples` (tokenize once, before
training). Pretraining objectives follow the model: `causal: true` trains next-token prediction
(`lm`), `causal: false` masked-token prediction (`mlm`).
"""

from __future__ import annotations

from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.tokenizer import Tokenizer
from slmkit.train.objectives.lm import LanguageModeling
from slmkit.train.objectives.mlm import MaskedLanguageModeling
from slmkit.train.objectives.protocol import Objective, StepLoss


def objective_for(cfg: ModelConfig, tokenizer: Tokenizer, seed: int, eval_batch_size: int = 8) -> LanguageModeling | MaskedLanguageModeling:
    """The pretraining objective of a model config."""
    if cfg.causal:
        return LanguageModeling(eval_batch_size)
    if tokenizer.pad_id is None:
        raise InputError("masked-LM training replaces masked tokens with <|pad|>, but the tokenizer has none")
    return MaskedLanguageModeling(mask_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, seed=seed, eval_batch_size=eval_batch_size)


__all__ = ["LanguageModeling", "MaskedLanguageModeling", "Objective", "StepLoss", "objective_for"]
