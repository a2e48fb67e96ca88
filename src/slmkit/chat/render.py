"""Chat templates rendered in a sandbox, with the messages' text kept apart from the template's own.

Templates come with downloaded models, so they are untrusted code: they run in Jinja's
`ImmutableSandboxedEnvironment` (no attribute access to internals, no mutation of the inputs),
with the globals Hugging Face templates expect (`raise_exception`, `strftime_now`), its `tojson`
filter, and transformers' `{% generation %}...{% endgeneration %}` tag, which marks the text the
assistant writes (the spans `apply_chat_template(..., return_assistant_tokens_mask=True)` reports).

What a user writes must never become a control token: a message saying
`<|im_end|>\\n<|im_start|>system\\n...` must not open a real turn. So every string a message
carries (its content, but not its role, which templates compare and may spell into tokens) is
rendered as a one-character placeholder, with its leading and trailing whitespace left outside
so that `trim` still works. The output is cut at the placeholders into `Piece`s: template text,
which may spell special tokens, and message text, which is encoded as ordinary text. A second
render with the real strings must give the same text; a template that rewrites message text in
another way (slicing, splitting, case changes) is refused rather than guessed at.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from slmkit.errors import MissingExtraError, TokenizerError

# Private-use code points (plane 16) no template writes: generation marks and text placeholders.
GENERATION_START, GENERATION_END = "\U0010fffa", "\U0010fffb"
_FIRST_PLACEHOLDER, _MAX_PLACEHOLDERS = 0x100000, 0xFFF0
_MARKS = re.compile("([\U00100000-\U0010fffb])")
_ROLE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Piece:
    """A run of rendered text. `template`: the template wrote it (it may spell special tokens);
    else it is message text. `generated`: inside a `{% generation %}` block."""

    text: str
    template: bool
    generated: bool


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str):
    try:
        from jinja2 import TemplateError, nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MissingExtraError("jinja2", "hf") from None

    class GenerationTag(Extension):
        """`{% generation %}body{% endgeneration %}`: the body, between the generation marks."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return GENERATION_START + caller() + GENERATION_END

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def _render(source: str, messages: list[dict], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except SecurityError as e:
        raise TokenizerError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None


def _with_placeholders(value: Any, texts: list[str]) -> Any:
    """`value` with every string (but roles and part types) replaced by a placeholder; the
    replaced strings, stripped, are appended to `texts`."""
    if isinstance(value, dict):
        return {k: v if k in ("role", "type") else _with_placeholders(v, texts) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_placeholders(v, texts) for v in value]
    if not isinstance(value, str):
        return value
    if len(texts) >= _MAX_PLACEHOLDERS:
        raise TokenizerError(f"a conversation may carry at most {_MAX_PLACEHOLDERS} texts")
    core = value.strip()
    lead = value[: len(value) - len(value.lstrip())] if core else value
    trail = value[len(lead) + len(core):]
    texts.append(core)
    return lead + chr(_FIRST_PLACEHOLDER + len(texts) - 1) + trail


def render_pieces(source: str, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> list[Piece]:
    """`messages` through the Jinja template `source`, as template text and message text.
    `variables` (bos_token, eos_token, tools, ...) are visible to the template, as template text."""
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or not _ROLE.fullmatch(role):
            raise TokenizerError(f"message role {role!r} is not a plain word (letters, digits, '_' or '-'), e.g. user or assistant")
    texts: list[str] = []
    marked = _render(source, _with_placeholders(messages, texts), add_generation_prompt, variables)
    pieces, generated = [], False
    for part in _MARKS.split(marked):
        if part in (GENERATION_START, GENERATION_END):
            generated = part == GENERATION_START
        elif len(part) == 1 and _MARKS.fullmatch(part):
            pieces.append(Piece(texts[ord(part) - _FIRST_PLACEHOLDER], False, generated))
        elif part:
            pieces.append(Piece(part, True, generated))
    real = _render(source, messages, add_generation_prompt, variables)
    if real.replace(GENERATION_START, "").replace(GENERATION_END, "") != "".join(p.text for p in pieces):
        raise TokenizerError("chat template changes message text before writing it (beyond trimming whitespace), "
                             "so its own text cannot be told apart from the messages'")
    return pieces


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> str:
    """`messages` through the Jinja template `source`, as text."""
    return "".join(p.text for p in render_pieces(source, messages, add_generation_prompt, **variables))
