"""Prompt templates for instruction tuning: the same rendering at training and at inference.

A record is Alpaca-style (`instruction`, optional `input`, `output`) or chat-style (`messages`:
a list of {role, content}, the last one the assistant's answer). A template turns it into prompt
token ids and response token ids; the response ends with the template's stop token.

- `alpaca`: the Stanford Alpaca prompt, response ended by `<|endoftext|>`.
- `chatml`: `<|im_start|>role\\n...<|im_end|>` turns; needs those two special tokens.
- `model`: the tokenizer's own Jinja chat template (`chat_template` in tokenizer_config.json),
  rendered in a sandboxed Jinja environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit.errors import InputError, TokenizerError
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.chat_template import render_chat_template
from slmkit.tokenizer.hf_format import chat_template_of

TEMPLATES = ("alpaca", "chatml", "model")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Either record shape -> chat messages (the assistant's answer last, when there is one)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InputError(f"{record.get('_source', 'record')}: messages must be a list of {{role, content}} objects")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" not in record:
        raise InputError(f"{record.get('_source', 'record')}: needs `instruction` (+ `input`, `output`) or `messages`")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if record.get("output"):
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def split_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


@dataclass
class Encoded:
    prompt: list[int]
    response: list[int]  # empty when the record has no answer


class Template:
    name: str

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, record: dict[str, Any]) -> Encoded:
        """Prompt ids and response ids (the response ends with the stop token)."""
        raise NotImplementedError

    @property
    def stop_tokens(self) -> list[int]:
        return [self.tokenizer.eot_id] if self.tokenizer.eot_token else []


class AlpacaTemplate(Template):
    name = "alpaca"

    def encode(self, record: dict[str, Any]) -> Encoded:
        if not self.tokenizer.eot_token:
            raise InputError("the alpaca template ends responses with <|endoftext|>, which this tokenizer lacks")
        if "messages" in record:
            context, answer = split_answer(to_messages(record))
            instruction, extra = "\n\n".join(m["content"] for m in context if m["role"] != "assistant"), ""
        else:
            instruction, extra, answer = record["instruction"], record.get("input") or "", record.get("output") or None
        prompt = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n"
        if extra:
            prompt += f"### Input:\n{extra}\n\n"
        prompt += "### Response:\n"
        encode = self.tokenizer.encode_ordinary
        return Encoded(encode(prompt), encode(answer) + [self.tokenizer.eot_id] if answer else [])


class ChatMLTemplate(Template):
    name = "chatml"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
        if missing:
            raise InputError(f"the chatml template needs the special tokens {' and '.join(missing)}, which this tokenizer "
                             "lacks; use --template alpaca or a tokenizer trained with them")
        self.start, self.end = tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]

    def _turn(self, role: str, content: str) -> list[int]:
        return [self.start, *self.tokenizer.encode_ordinary(f"{role}\n{content}"), self.end, *self.tokenizer.encode_ordinary("\n")]

    def encode(self, record: dict[str, Any]) -> Encoded:
        context, answer = split_answer(to_messages(record))
        prompt = [t for m in context for t in self._turn(m["role"], m["content"])]
        prompt += [self.start, *self.tokenizer.encode_ordinary("assistant\n")]
        return Encoded(prompt, self.tokenizer.encode_ordinary(answer) + [self.end] if answer else [])

    @property
    def stop_tokens(self) -> list[int]:
        return [self.end, *super().stop_tokens]


class ModelTemplate(Template):
    """The tokenizer's own Jinja chat template, as Hugging Face tokenizers ship it."""

    name = "model"

    def __init__(self, tokenizer: Tokenizer, model_dir: str | os.PathLike) -> None:
        super().__init__(tokenizer)
        path = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.source = tokenizer.chat_template or chat_template_of(Path(model_dir))
        if not self.source:
            raise InputError(f"{model_dir} has no chat template (no chat_template in tokenizer_config.json); "
                             "use --template alpaca or chatml")
        self.tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        eos = self.tokens["eos_token"]
        known = {**tokenizer.special_tokens, **tokenizer.added_tokens}
        self._stop = [known[eos]] if eos in known else []

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return render_chat_template(self.source, messages, generation_prompt, **self.tokens)
        except TokenizerError as e:
            raise InputError(f"the model's chat template refused the record: {e}") from None

    def encode(self, record: dict[str, Any]) -> Encoded:
        messages = to_messages(record)
        context, answer = split_answer(messages)
        prompt_text = self._render(context, True)
        prompt = self.tokenizer.encode(prompt_text, allowed_special="all")
        if answer is None:
            return Encoded(prompt, [])
        full = self._render(messages, False)
        if not full.startswith(prompt_text):
            raise InputError("the model's chat template renders the prompt differently once the answer is added; "
                             "use --template chatml or alpaca")
        return Encoded(prompt, self.tokenizer.encode(full[len(prompt_text):], allowed_special="all"))

    @property
    def stop_tokens(self) -> list[int]:
        return self._stop or super().stop_tokens


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def get_template(name: str, tokenizer: Tokenizer, model_dir: str | os.PathLike | None = None) -> Template:
    if name == "alpaca":
        return AlpacaTemplate(tokenizer)
    if name == "chatml":
        return ChatMLTemplate(tokenizer)
    if name == "model":
        if model_dir is None:
            raise InputError("--template model needs the model directory that holds tokenizer_config.json")
        return ModelTemplate(tokenizer, model_dir)
    raise InputError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
