"""Chat messages -> prompt token ids, with the model's own chat template.

The template is the Jinja2 `chat_template` of `tokenizer_config.json` (the Hugging Face
convention), rendered by the tokenizer's sandboxed renderer since it comes with the model. Without one, a tokenizer that
has `<|im_start|>`/`<|im_end|>` special tokens gets ChatML.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from slmkit.errors import InputError, TokenizerError
from slmkit.generation.chat import IM_END, IM_START
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.chat_template import render_chat_template
from slmkit.tokenizer.hf_format import chat_template_of

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplate:
    """`render(messages)` -> the prompt text; `stop_tokens` end an assistant turn."""

    def __init__(self, source: str, tokenizer: Tokenizer, config: dict) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self.special = {k: config.get(k) for k in ("bos_token", "eos_token")}
        specials = tokenizer.special_tokens
        self.stop_tokens = [tokenizer.eot_id] if tokenizer.eot_token else []
        if IM_END in specials:
            self.stop_tokens.append(specials[IM_END])

    @classmethod
    def for_model(cls, directory: str | os.PathLike, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The model's template, else ChatML when the tokenizer can spell it, else None."""
        path = Path(directory) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        source = tokenizer.chat_template or chat_template_of(Path(directory))
        if source:
            return cls(source, tokenizer, config)
        if IM_START in tokenizer.special_tokens and IM_END in tokenizer.special_tokens:
            return cls(CHATML, tokenizer, config)
        return None

    def render(self, messages: list[dict]) -> list[int]:
        try:
            text = render_chat_template(self.source, messages, add_generation_prompt=True, **self.special)
        except TokenizerError as e:
            raise InputError(f"the chat template cannot render these messages: {e}") from None
        return self.tokenizer.encode(text, allowed_special="all")
