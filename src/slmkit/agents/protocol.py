"""How an agent talks to the model about tools: the server's native OpenAI tool calls, or a text
protocol for servers (and small models) without them.

Both protocols turn a chat-completion message into a `Turn` (tool calls, or a final answer, or a
format error the model is shown) and turn tool results back into messages, so the loop in
agent.py never knows which one is in use.

The text protocol. The system prompt lists the tools (name, description, JSON Schema of the
arguments) and asks for exactly one JSON object per reply:

    {"thought": "...", "tool": "calculator", "arguments": {"expression": "17 * 23"}}   call a tool
    {"thought": "...", "answer": "391"}                                                 finish

Tool results come back as a user message "Observation from calculator: 391". Parsing is lenient
where small models stray: code fences and prose around the object, `name` / `action` /
`function` for "tool", `args` / `parameters` / `action_input` for "arguments", arguments given as a
JSON string, `{"action": "Final Answer", "action_input": ...}`. A reply with no JSON object at all
is taken as the final answer; one whose JSON does not parse, or names neither a tool nor an
answer, is a format error shown to the model with the expected form.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from slmkit.agents.tools import Tool

_TOOL_KEYS = ("tool", "name", "action", "function", "tool_name")
_ARGUMENT_KEYS = ("arguments", "args", "parameters", "action_input", "input", "tool_input")
_ANSWER_KEYS = ("answer", "final_answer", "final", "response")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


@dataclass
class ToolCall:
    """One call the model asked for. `arguments` is whatever the model sent (validated when run)."""

    name: str
    arguments: Any
    id: str = field(default_factory=lambda: new_call_id())
    approved: bool = False

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "arguments": self.arguments, "approved": self.approved}

    @classmethod
    def from_dict(cls, d: dict) -> "ToolCall":
        return cls(d["name"], d.get("arguments"), d["id"], bool(d.get("approved", False)))


@dataclass
class Turn:
    """What one model reply asked for: tool calls, a final answer, or neither (`error` says why)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    error: str | None = None
    message: dict = field(default_factory=dict)  # the assistant message to keep in the conversation


class NativeProtocol:
    """OpenAI `tools` in the request, `message.tool_calls` in the reply, `tool` messages back."""

    name = "native"

    def system_prompt(self, base: str, tools: list[Tool]) -> str:
        return base

    def request_options(self, tools: list[Tool]) -> dict:
        return {"tools": [t.schema() for t in tools], "tool_choice": "auto"} if tools else {}

    def parse(self, message: Any) -> Turn:
        content = message.content or ""
        raw_calls = message.tool_calls or []
        calls = [ToolCall(c.function.name, _decoded(c.function.arguments), c.id or new_call_id()) for c in raw_calls]
        kept = {"role": "assistant", "content": content}
        if calls:
            kept["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                                                else json.dumps(c.arguments)}} for c in calls]
            return Turn(content, calls, message=kept)
        return Turn(content, answer=content.strip(), message=kept)

    def result_message(self, call: ToolCall, text: str) -> dict:
        return {"role": "tool", "tool_call_id": call.id, "content": text}

    def correction_message(self, error: str) -> dict:
        return {"role": "user", "content": error}


class TextProtocol:
    """One JSON object per reply, described in the system prompt (see the module docstring)."""

    name = "text"

    def system_prompt(self, base: str, tools: list[Tool]) -> str:
        listing = "\n".join(f"- {t.name}: {t.description}\n  arguments (JSON Schema): {json.dumps(t.parameters)}"
                            for t in tools)
        return (f"{base}\n\nYou can use these tools:\n{listing}\n\n"
                "Reply with exactly one JSON object and nothing else.\n"
                'To use a tool: {"thought": "why", "tool": "TOOL_NAME", "arguments": {...}}\n'
                'To give the final answer: {"thought": "why", "answer": "THE ANSWER"}\n'
                'After a tool call you receive "Observation from TOOL_NAME: RESULT"; then reply again.')

    def request_options(self, tools: list[Tool]) -> dict:
        return {}

    def parse(self, message: Any) -> Turn:
        content = message.content or ""
        kept = {"role": "assistant", "content": content}
        found = _json_objects(content)
        if not found:
            if "{" in content:
                return Turn(content, error=self._format_error("the JSON object in your reply does not parse"), message=kept)
            return Turn(content, answer=content.strip(), message=kept)
        for obj in found:
            step = _read_step(obj)
            if step is not None:
                name, arguments, answer = step
                if answer is not None:
                    return Turn(content, answer=answer, message=kept)
                return Turn(content, [ToolCall(name, arguments)], message=kept)
        return Turn(content, error=self._format_error('your JSON object has neither "tool" nor "answer"'), message=kept)

    def result_message(self, call: ToolCall, text: str) -> dict:
        return {"role": "user", "content": f"Observation from {call.name}: {text}"}

    def correction_message(self, error: str) -> dict:
        return {"role": "user", "content": error}

    @staticmethod
    def _format_error(problem: str) -> str:
        return (f"Format error: {problem}. Reply with one JSON object: "
                '{"tool": "TOOL_NAME", "arguments": {...}} or {"answer": "..."}')


PROTOCOLS = {"native": NativeProtocol, "text": TextProtocol}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in `text`, fenced blocks first, each parsed from a `{` where one starts."""
    decoder = json.JSONDecoder()
    found: list[dict] = []
    for source in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        i = source.find("{")
        while i != -1:
            try:
                obj, end = decoder.raw_decode(source, i)
            except json.JSONDecodeError:
                i = source.find("{", i + 1)
                continue
            if isinstance(obj, dict):
                found.append(obj)
            i = source.find("{", end)
    return found


def _decoded(arguments: Any) -> Any:
    """Native arguments arrive as a JSON string: keep the object it holds, or the string when it holds none."""
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return value if isinstance(value, dict) else arguments
    return arguments


def _read_step(obj: dict) -> tuple[str | None, Any, str | None] | None:
    """(tool name, arguments, None) or (None, None, answer) from one parsed object; None when it is neither."""
    lowered = {str(k).lower(): v for k, v in obj.items()}
    for key in _ANSWER_KEYS:
        if key in lowered and not any(k in lowered for k in _TOOL_KEYS):
            return None, None, _as_answer(lowered[key])
    name = next((lowered[k] for k in _TOOL_KEYS if isinstance(lowered.get(k), str)), None)
    if name is None and isinstance(lowered.get("function"), dict):  # {"function": {"name": ..., "arguments": ...}}
        return _read_step(lowered["function"])
    if name is None:
        return None
    arguments = next((lowered[k] for k in _ARGUMENT_KEYS if k in lowered), {})
    if name.strip().lower().replace("_", " ") in ("final answer", "answer", "finish"):
        return None, None, _as_answer(arguments)
    return name.strip(), arguments, None


def _as_answer(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
