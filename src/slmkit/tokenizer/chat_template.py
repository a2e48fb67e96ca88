"""Chat templates: a model's own Jinja template, rendered in a sandbox.

Templates come with downloaded models, so they are untrusted code: they run in Jinja's
`ImmutableSandboxedEnvironment` (no attribute access to internals, no mutation of the inputs),
with the globals Hugging Face templates expect (`raise_exception`, `strftime_now`) and its
`tojson` filter.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from slmkit.errors import MissingExtraError, TokenizerError


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MissingExtraError("jinja2", "hf") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> str:
    """`messages` through `template`; `variables` (bos_token, eos_token, tools, ...) are visible to it."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except SecurityError as e:
        raise TokenizerError(f"chat template tried an unsafe operation and was stopped: {e}") from None
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
