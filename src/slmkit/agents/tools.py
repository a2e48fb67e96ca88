"""Tools an agent can call: a typed Python function becomes a name, a description and a JSON Schema
(from its signature and docstring), and calls to it are validated, time-limited and turned into text.

Arguments are validated by pydantic in its lax mode, so a small model's `"5"` for an `int` is
accepted while `"five"` is an error the model is shown. A tool whose function takes one parameter
also accepts a bare value instead of an object (`"2+3"` for `{"expression": "2+3"}`).
"""

from __future__ import annotations

import contextvars
import inspect
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from slmkit.errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the OpenAI API accepts as a function name
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?)\s*:\s*$")


class ToolFailure(Exception):
    """A call that could not produce a result; `kind` says why: unknown_tool, invalid_arguments,
    error (the function raised) or timeout. The message is what the model is shown."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Tool:
    """One callable tool. Build it with `tool(function)`; `parameters` is a JSON Schema object."""

    name: str
    description: str
    parameters: dict
    function: Callable[..., Any]
    requires_approval: bool = False
    timeout_s: float | None = 30.0
    validator: Callable[[dict], dict] | None = field(default=None, repr=False)  # coerces and checks arguments

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")

    def schema(self) -> dict:
        """The OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def arguments(self, raw: Any) -> dict:
        """Validated keyword arguments from what the model sent, or ToolFailure("invalid_arguments")."""
        if isinstance(raw, str):
            try:
                parsed = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                parsed = raw
            raw = parsed if isinstance(parsed, dict) else raw  # "2+3" or "5" stay the string the model wrote
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            properties = list(self.parameters.get("properties", {}))
            if len(properties) != 1:
                raise ToolFailure("invalid_arguments", f"invalid arguments for {self.name}: expected a JSON object with "
                                                       f"{', '.join(properties) or 'no fields'}, got {json.dumps(raw)[:200]}")
            raw = {properties[0]: raw}
        return self.validator(raw) if self.validator else raw

    def call(self, raw_arguments: Any) -> str:
        """Run the tool on the model's arguments and return its result as text; ToolFailure when the
        arguments are invalid, the function raises, or it runs past timeout_s (the thread it ran in
        is left to finish on its own: Python cannot stop a thread)."""
        kwargs = self.arguments(raw_arguments)
        outcome: dict[str, Any] = {}
        done = threading.Event()
        context = contextvars.copy_context()

        def target() -> None:
            try:
                outcome["value"] = context.run(self.function, **kwargs)
            except BaseException as e:  # noqa: BLE001 - every failure is reported to the model
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=f"tool-{self.name}", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise ToolFailure("timeout", f"{self.name} did not finish within {self.timeout_s:g} s")
        if "error" in outcome:
            e = outcome["error"]
            if isinstance(e, ToolFailure):
                raise e
            raise ToolFailure("error", f"{self.name} raised {type(e).__name__}: {e}")
        return as_text(outcome["value"])


def tool(function: Callable | None = None, *, name: str | None = None, description: str | None = None,
         requires_approval: bool = False, timeout_s: float | None = 30.0) -> Any:
    """Make a Tool of a typed function (usable bare, `@tool`, or with options, `@tool(requires_approval=True)`).
    Its name is the function's, its description the docstring's summary, and each parameter's
    description comes from a Google-style `Args:` section."""
    def make(fn: Callable) -> Tool:
        summary, param_docs = parse_docstring(inspect.getdoc(fn) or "")
        schema, validate = signature_schema(fn, param_docs)
        return Tool(name or fn.__name__, description or summary or (name or fn.__name__), schema, fn,
                    requires_approval, timeout_s, validate)
    return make(function) if function is not None else make


def as_tool(item: Any) -> Tool:
    """A Tool from a Tool, an agent (`Agent.as_tool()`) or a typed function."""
    if isinstance(item, Tool):
        return item
    if hasattr(item, "as_tool"):
        return item.as_tool()
    if callable(item):
        return tool(item)
    raise InputError(f"{item!r} is not a tool: pass a Tool, an Agent or a typed function")


def signature_schema(fn: Callable, param_docs: dict[str, str]) -> tuple[dict, Callable[[dict], dict]]:
    """A JSON Schema of `fn`'s parameters and a validator that coerces a dict to its keyword arguments."""
    from pydantic import ConfigDict, Field, ValidationError, create_model

    fields = {}
    hints = _type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise InputError(f"tool {fn.__name__}: parameter {param.name} must be a plain keyword parameter")
        if param.name not in hints:
            raise InputError(f"tool {fn.__name__}: parameter {param.name} has no type annotation; tools need typed parameters")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=param_docs.get(param.name)))
    model = create_model(f"{fn.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)

    def validate(raw: dict) -> dict:
        try:
            parsed = model.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in e.errors())
            raise ToolFailure("invalid_arguments", f"invalid arguments for {fn.__name__}: {problems}") from None
        return {name: getattr(parsed, name) for name in fields}

    return _drop_titles(model.model_json_schema()), validate


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {parameter: description}) from a Google-style docstring."""
    summary_lines, params, section, current = [], {}, None, None
    for line in doc.splitlines():
        heading = _SECTION.match(line)
        if heading:
            section, current = heading.group(1).lower(), None
            continue
        if section is None:
            summary_lines.append(line.strip())
        elif section in ("args", "arguments", "parameters") and line.strip():
            entry = re.match(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
            if entry and (current is None or _indent(line) <= params[current][0]):
                current = entry.group(1).lstrip("*")
                params[current] = (_indent(line), entry.group(3).strip())
            elif current is not None:
                params[current] = (params[current][0], f"{params[current][1]} {line.strip()}".strip())
    summary = " ".join(" ".join(summary_lines).split())
    return summary, {name: text for name, (_, text) in params.items() if text}


def as_text(value: Any) -> str:
    """A tool's result as the text the model reads."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _type_hints(fn: Callable) -> dict:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception as e:  # noqa: BLE001 - an annotation that does not resolve
        raise InputError(f"tool {getattr(fn, '__name__', fn)}: cannot read its type annotations ({e})") from None


def _drop_titles(schema: Any) -> Any:
    """pydantic's auto-generated "title" keys: noise in a small model's prompt (property names stay)."""
    if isinstance(schema, dict):
        return {k: ({name: _drop_titles(v) for name, v in value.items()} if k in ("properties", "$defs") else _drop_titles(value))
                for k, value in schema.items() if not (k == "title" and isinstance(value, str))}
    if isinstance(schema, list):
        return [_drop_titles(v) for v in schema]
    return schema
