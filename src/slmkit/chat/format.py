"""`ChatFormat`: a chat template bound to a tokenizer, the one object every consumer uses.

`slmkit chat`, the server's /v1/chat/completions, SFT and DPO, `eval generate`, the GGUF
`tokenizer.chat_template` key and the Ollama Modelfile all take their prompt ids, stop tokens and
template from it. SFT writes its template into the tuned model directory (`save`), and
`ChatFormat.for_model` reads it back, so a model tuned with alpaca is chatted with, served and
exported in alpaca.

Only the template's own text can produce special tokens: message text is encoded as ordinary
text (see `slmkit.chat.render`). Training and inference cut the same places into token
boundaries: special tokens, the edges of `{% generation %}` spans, and the end of the prompt.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex

from slmkit.chat.render import Piece, render_pieces
from slmkit.chat.templates import BUILTINS, CHATML_TOKENS
from slmkit.errors import InputError, TokenizerError

if TYPE_CHECKING:
    from slmkit.tokenizer import Tokenizer

TEMPLATE_CHOICES = ("alpaca", "chatml", "model")  # for SFT/DPO/eval; or a path to a .jinja file
StopTokens = Sequence[int | str] | None


@dataclass
class Encoded:
    """A conversation as ids; `assistant_mask` is True on the ids inside `{% generation %}` spans."""

    ids: list[int]
    assistant_mask: list[bool]


@dataclass
class Example:
    """A record for SFT/DPO: the prompt, and the answer's ids (ending with the stop token; empty when
    the record has none). `prompt_mask` marks earlier assistant turns inside the prompt."""

    prompt: list[int]
    response: list[int]
    prompt_mask: list[bool] = field(default_factory=list)


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca-style (`instruction`, `input`, `output`) or chat (`messages`) record -> chat
    messages, the assistant's answer last when there is one. An Alpaca user message keeps its
    `instruction` and `input` apart too, for the alpaca template's "### Input:" section."""
    where = record.get("_source", "record")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InputError(f"{where}: messages must be a list of {{role, content}} objects")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" not in record:
        raise InputError(f"{where}: needs `instruction` (+ `input`, `output`) or `messages`")
    user = {"role": "user", "content": record["instruction"]}
    if record.get("input"):
        user = {**user, "content": f"{record['instruction']}\n\n{record['input']}", "instruction": record["instruction"],
                "input": record["input"]}
    return [user, {"role": "assistant", "content": record["output"]}] if record.get("output") else [user]


def split_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """(the context, the final assistant message's content or None)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def stop_token_ids(tokenizer: Tokenizer, stop_tokens: StopTokens) -> list[int]:
    """Ids or token strings (as in generation.json) -> ids; None means the end-of-text token."""
    if stop_tokens is None:
        return [tokenizer.eot_id] if tokenizer.eot_token else []
    known = {**tokenizer.added_tokens, **tokenizer.special_tokens}
    ids = []
    for token in stop_tokens:
        if isinstance(token, str):
            if token not in known:
                raise InputError(f"stop token {token!r} is not a special or added token of this tokenizer")
            token = known[token]
        ids.append(token)
    return ids


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> Encoded:
    """Rendered pieces -> ids. Special-token strings become special tokens only inside template
    text; elsewhere the text is encoded whole, so BPE merges across message edges as usual."""
    specials = _special_matcher(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    for generated, run in itertools.groupby(pieces, key=lambda p: p.generated):
        segments: list[str | int] = [""]  # text, or the id of a special token the template wrote
        for piece in run:
            pos = 0
            for m in specials.finditer(piece.text) if piece.template and specials else ():
                segments[-1] += piece.text[pos : m.start()]
                segments += [tokenizer.special_tokens[m.group()], ""]
                pos = m.end()
            segments[-1] += piece.text[pos:]
        encoded = iter(tokenizer.encode_ordinary_batch([s for s in segments if isinstance(s, str) and s]))
        start = len(ids)
        for s in segments:
            if isinstance(s, int):
                ids.append(s)
            elif s:
                ids += next(encoded)
        mask += [generated] * (len(ids) - start)
    return Encoded(ids, mask)


def _special_matcher(tokenizer: Tokenizer) -> regex.Pattern | None:
    if not tokenizer.special_tokens:
        return None
    ordered = sorted(tokenizer.special_tokens, key=lambda s: (-len(s), s))  # longest first, as HF matches
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def _split_at(pieces: Sequence[Piece], offset: int) -> tuple[list[Piece], list[Piece]]:
    """The pieces before and after character `offset` of their joined text."""
    before, after = [], []
    for p in pieces:
        if offset >= len(p.text):
            before.append(p)
        elif offset <= 0:
            after.append(p)
        else:
            before.append(Piece(p.text[:offset], p.template, p.generated))
            after.append(Piece(p.text[offset:], p.template, p.generated))
        offset -= len(p.text)
    return before, after


def _text(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces)


class ChatFormat:
    """A chat template (Jinja source) bound to a tokenizer: messages -> prompt ids, the stop
    tokens that end a reply, and SFT/DPO examples.

    `stop_tokens`: the special token the template writes after an assistant turn (found by
    rendering one), then `extra_stop_tokens` (generation.json's), then the end-of-text token.
    `stop`: strings that end a reply (only for templates whose turns end in plain text)."""

    def __init__(self, name: str, source: str, tokenizer: Tokenizer, extra_stop_tokens: StopTokens = (),
                 stop: Sequence[str] = ()) -> None:
        self.name, self.source, self.tokenizer, self.stop = name, source, tokenizer, list(stop)
        self.variables = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eot_token, "pad_token": tokenizer.pad_token}
        ends = [*self._turn_end(), *stop_token_ids(tokenizer, extra_stop_tokens or []), *stop_token_ids(tokenizer, None)]
        self.stop_tokens = list(dict.fromkeys(ends))

    # ------------------------------------------------------------------ finding one
    @classmethod
    def builtin(cls, name: str, tokenizer: Tokenizer, extra_stop_tokens: StopTokens = ()) -> ChatFormat:
        """alpaca, chatml or plain (see `slmkit.chat.templates`)."""
        template = BUILTINS[name]
        missing = [t for t in template.needs_tokens if t not in tokenizer.special_tokens]
        if missing:
            raise InputError(f"the {name} template needs the special tokens {' and '.join(missing)}, which this tokenizer "
                             "lacks; use --template alpaca or a tokenizer trained with them")
        if template.needs_eos and not tokenizer.eot_token:
            raise InputError(f"the {name} template ends responses with the end-of-text token, which this tokenizer lacks")
        return cls(name, template.source, tokenizer, extra_stop_tokens, template.stop)

    @classmethod
    def from_name(cls, name: str, tokenizer: Tokenizer, model_dir: str | os.PathLike | None = None) -> ChatFormat:
        """The format SFT/DPO/eval `--template` names: alpaca, chatml, model (the tokenizer's own
        chat template, from `model_dir`'s tokenizer_config.json) or a path to a Jinja file."""
        if name in ("alpaca", "chatml"):
            return cls.builtin(name, tokenizer)
        if name == "model":
            source = tokenizer.chat_template
            if not source and model_dir is not None:
                from slmkit.tokenizer.hf_format import chat_template_of

                source = chat_template_of(Path(model_dir))
            if not source:
                raise InputError(f"{model_dir or 'the tokenizer'} has no chat template (no chat_template in "
                                 "tokenizer_config.json); use --template alpaca or chatml")
            return cls("model", source, tokenizer)
        if name.endswith((".jinja", ".j2")):
            path = Path(name)
            if not path.is_file():
                raise InputError(f"chat template file {path} does not exist")
            return cls(name, path.read_text(encoding="utf-8"), tokenizer)
        raise InputError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_CHOICES)}, or a .jinja file")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, extra_stop_tokens: StopTokens = (), name: str = "model") -> ChatFormat | None:
        """The tokenizer's own chat template, else ChatML when the tokenizer can spell it, else None."""
        if tokenizer.chat_template:
            return cls(name, tokenizer.chat_template, tokenizer, extra_stop_tokens)
        if all(t in tokenizer.special_tokens for t in CHATML_TOKENS):
            return cls.builtin("chatml", tokenizer, extra_stop_tokens)
        return None

    @classmethod
    def for_model(cls, directory: str | os.PathLike, tokenizer: Tokenizer) -> ChatFormat | None:
        """The format of a model directory (whose tokenizer is `tokenizer`): its chat template with
        the stop tokens of its generation.json, as SFT wrote them; ChatML or None without one."""
        path = Path(directory) / "generation.json"
        generation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        name, stops = generation.get("template") or "model", generation.get("stop_tokens") or ()
        if not tokenizer.chat_template and name in BUILTINS:  # tuned before templates were written into the directory
            return cls.builtin(name, tokenizer, stops)
        return cls.for_tokenizer(tokenizer, stops, name)

    # ------------------------------------------------------------------ rendering
    def pieces(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[Piece]:
        try:
            return render_pieces(self.source, messages, add_generation_prompt, **self.variables)
        except TokenizerError as e:
            raise InputError(f"the {self.name} chat template cannot render these messages: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as text (what llama.cpp and transformers render from the same source)."""
        return _text(self.pieces(messages, add_generation_prompt))

    def encode(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> Encoded:
        return encode_pieces(self.tokenizer, self.pieces(messages, add_generation_prompt))

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The conversation as prompt ids, ending where the assistant's reply begins."""
        return self.encode(messages, add_generation_prompt=True).ids

    def encode_record(self, record: dict[str, Any]) -> Example:
        """A training record -> the prompt (as `prompt_ids` gives it at inference) and the answer:
        the last `{% generation %}` span when the template marks one, else all that the answer adds."""
        messages = to_messages(record)
        context, answer = split_answer(messages)
        prompt_pieces = self.pieces(context, True)
        prompt = encode_pieces(self.tokenizer, prompt_pieces)
        if answer is None:
            return Example(prompt.ids, [], prompt.assistant_mask)
        full = self.pieces(messages, False)
        prompt_text = _text(prompt_pieces)
        starts = [i for i, p in enumerate(full) if p.generated and (i == 0 or not full[i - 1].generated)]
        if starts:
            end = next((i for i in range(starts[-1], len(full)) if not full[i].generated), len(full))
            before, response = full[: starts[-1]], full[starts[-1] : end]
        else:
            before, response = _split_at(full, len(prompt_text))
        if _text(before) != prompt_text:
            raise InputError(f"the {self.name} chat template renders the prompt differently once the answer is added; "
                             "use --template chatml or alpaca")
        return Example(prompt.ids, encode_pieces(self.tokenizer, response).ids, prompt.assistant_mask)

    def _turn_end(self) -> list[int]:
        """The special token the template writes right after an assistant's text, if any."""
        try:
            pieces = render_pieces(self.source, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                   False, **self.variables)
        except (TokenizerError, InputError):
            return []
        texts = [i for i, p in enumerate(pieces) if not p.template]
        specials = _special_matcher(self.tokenizer)
        found = specials.match(_text(pieces[texts[-1] + 1 :]).lstrip()) if texts and specials else None
        return [self.tokenizer.special_tokens[found.group()]] if found else []

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> None:
        """Write the template into a model directory: `chat_template` of tokenizer_config.json (and
        chat_template.jinja, when there is one, since it takes precedence), and the stop tokens and
        template name in generation.json."""
        from slmkit._io import write_json, write_text_atomic

        directory = Path(directory)
        config_path, generation_path = directory / "tokenizer_config.json", directory / "generation.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        write_json(config_path, {**config, "chat_template": self.source})
        if (directory / "chat_template.jinja").is_file():
            write_text_atomic(directory / "chat_template.jinja", self.source)
        generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
        names = {i: t for t, i in {**self.tokenizer.added_tokens, **self.tokenizer.special_tokens}.items()}
        write_json(generation_path, {**generation, "template": self.name if self.name in BUILTINS else "model",
                                     "stop_tokens": [names.get(i, i) for i in self.stop_tokens]})

    def __repr__(self) -> str:
        return f"ChatFormat({self.name!r}, stop_tokens={self.stop_tokens})"
