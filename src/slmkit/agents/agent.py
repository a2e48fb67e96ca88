"""The agent loop: ask the model, run the tools it calls, show it the results, until it answers.

    loop:  1) run the tool calls still pending (pausing at one that needs approval)
           2) stop at the step cap
           3) ask the model; its reply is tool calls, a final answer, or a format error
              that is shown to it like a tool error

Every step is a trace record (kept on the run and, with `trace=PATH`, appended to a JSONL file as
it happens). The whole run state is plain JSON: a run paused for approval can be saved, loaded in
another process and resumed with approve / deny / edit. Tool errors (unknown tool, invalid
arguments, a raise, a timeout) are shown to the model so it can retry; after
`max_errors_in_a_row` of them the run stops as "failed" with everything kept.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from slmkit.agents.protocol import PROTOCOLS, ToolCall
from slmkit.agents.tools import Tool, ToolFailure, as_tool
from slmkit.errors import InputError, MissingExtraError, SlmkitError

DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant. Solve the user's task step by step, using the tools when they "
                         "help, and finish with a short final answer.")
STATUSES = ("running", "paused", "done", "max_steps", "failed")
DECISIONS = ("approve", "deny", "edit")
_current_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("slmkit_agent_run", default=None)


class ModelError(SlmkitError):
    """The model server could not be reached or refused a request."""


@dataclass
class AgentRun:
    """Everything about one run, JSON-serializable: the conversation, the pending tool calls, the trace."""

    task: str
    protocol: str
    messages: list[dict]
    agent: str = "agent"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parent_run_id: str | None = None
    status: str = "running"
    steps: int = 0
    answer: str | None = None
    error: str | None = None
    pending: list[ToolCall] = field(default_factory=list)
    errors_in_a_row: int = 0
    trace: list[dict] = field(default_factory=list)

    @property
    def awaiting(self) -> ToolCall | None:
        """The call waiting for approval, when paused."""
        return self.pending[0] if self.status == "paused" else None

    def to_dict(self) -> dict:
        return {**asdict(self), "pending": [c.to_dict() for c in self.pending]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "AgentRun":
        try:
            run = cls(**{**d, "pending": [ToolCall.from_dict(c) for c in d.get("pending", [])]})
        except (TypeError, KeyError) as e:
            raise InputError(f"not an agent run state: {e}") from None
        if run.status not in STATUSES or run.protocol not in PROTOCOLS:
            raise InputError(f"not an agent run state: status {run.status!r}, protocol {run.protocol!r}")
        return run

    @classmethod
    def from_json(cls, text: str) -> "AgentRun":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise InputError(f"agent run state is not JSON: {e}") from None


class Agent:
    """A ReAct-style agent over an OpenAI-compatible chat endpoint.

    `model` is a base URL (`http://127.0.0.1:8000` or `.../v1`) or an `openai.OpenAI` client.
    `tools` are Tools, typed functions or other agents. `protocol`: "native" (OpenAI tool calls),
    "text" (the JSON-per-step protocol of protocol.py) or "auto": native, falling back to text on
    the first request when the server rejects `tools`. Trace records go to `run.trace`, to the JSONL
    file `trace` and to `on_record(record)` as they happen.
    """

    def __init__(self, model: Any, tools: Iterable[Any] = (), *, model_name: str | None = None, api_key: str | None = None,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, protocol: str = "auto", max_steps: int = 10,
                 max_errors_in_a_row: int = 3, temperature: float = 0.0, max_tokens: int = 512,
                 trace: str | Path | None = None, on_record: Callable[[dict], None] | None = None,
                 name: str = "agent", max_observation_chars: int = 4000, timeout_s: float = 300.0) -> None:
        if protocol not in ("auto", *PROTOCOLS):
            raise InputError(f"protocol must be auto, native or text, not {protocol!r}")
        if max_steps < 1 or max_errors_in_a_row < 1:
            raise InputError("max_steps and max_errors_in_a_row must be at least 1")
        self.client = _client(model, api_key, timeout_s)
        self.tools: dict[str, Tool] = {}
        for item in tools:
            t = as_tool(item)
            if t.name in self.tools:
                raise InputError(f"two tools are named {t.name!r}; tool names must be unique")
            self.tools[t.name] = t
        self.model_name, self.system_prompt, self.protocol = model_name, system_prompt, protocol
        self.max_steps, self.max_errors_in_a_row = max_steps, max_errors_in_a_row
        self.temperature, self.max_tokens, self.max_observation_chars = temperature, max_tokens, max_observation_chars
        self.trace_path = Path(trace) if trace is not None else None
        self.on_record, self.name = on_record, name

    # ------------------------------------------------------------------ public
    def run(self, task: str) -> AgentRun:
        """Run `task` until the model answers, the step cap, too many errors, or a call needing approval."""
        protocol = "text" if self.protocol == "text" else "native"
        run = AgentRun(task, protocol, self._first_messages(protocol, task), agent=self.name,
                       parent_run_id=_current_run.get())
        self._record(run, "start", task=task, protocol=protocol, tools=list(self.tools))
        return self._advance(run)

    def resume(self, run: AgentRun, decision: str | None = None, *, arguments: Any = None,
               reason: str | None = None) -> AgentRun:
        """Continue a paused run with "approve", "deny" (with an optional `reason` shown to the model)
        or "edit" (run the call with `arguments` instead), or retry a failed run (no decision)."""
        if run.status == "paused":
            if decision not in DECISIONS:
                raise InputError(f"a paused run needs a decision: {', '.join(DECISIONS)} (got {decision!r})")
            if decision == "edit" and arguments is None:
                raise InputError("edit needs the new arguments")
            call = run.pending[0]
            self._record(run, "approval", call=call.to_dict(), decision=decision, arguments=arguments, reason=reason)
            if decision == "deny":
                run.pending.pop(0)
                message = "The user denied this call." + (f" Reason: {reason}" if reason else "")
                run.messages.append(PROTOCOLS[run.protocol]().result_message(call, message))
            else:
                call.arguments = arguments if decision == "edit" else call.arguments
                call.approved = True
        elif run.status == "failed":
            if decision is not None:
                raise InputError(f"run {run.run_id} is not paused; retry it without a decision")
            run.errors_in_a_row = 0
        else:
            raise InputError(f"run {run.run_id} is {run.status}; only paused or failed runs resume")
        run.status, run.error = "running", None
        return self._advance(run)

    def as_tool(self, name: str | None = None, description: str | None = None, requires_approval: bool = False) -> Tool:
        """This agent as a tool of another: it takes a task and returns this agent's answer."""
        def ask(task: str) -> str:
            run = self.run(task)
            if run.status == "done":
                return run.answer or ""
            what = f"paused for approval of {run.awaiting.name}; approvals inside a sub-agent are not supported" \
                if run.status == "paused" else (run.error or run.status)
            raise RuntimeError(f"agent {self.name} did not finish: {what}")
        parameters = {"type": "object", "properties": {"task": {"type": "string", "description": "the task, in full"}},
                      "required": ["task"], "additionalProperties": False}
        return Tool(name or self.name, description or f"Ask the {self.name} agent to do a task; it replies with its answer.",
                    parameters, ask, requires_approval, timeout_s=None)

    # ------------------------------------------------------------------ the loop
    def _advance(self, run: AgentRun) -> AgentRun:
        token = _current_run.set(run.run_id)
        try:
            while run.status == "running":
                # 1) tool calls the model asked for, in order; a call needing approval pauses the run
                while run.pending and run.status == "running":
                    call = run.pending[0]
                    tool = self.tools.get(call.name)
                    if tool is not None and tool.requires_approval and not call.approved:
                        run.status = "paused"
                        self._record(run, "paused", call=call.to_dict())
                        break
                    run.pending.pop(0)
                    self._execute(run, call)
                    self._check_errors(run)
                if run.status != "running":
                    break
                # 2) the step cap
                if run.steps >= self.max_steps:
                    run.status, run.error = "max_steps", f"no answer within {self.max_steps} model steps"
                    break
                # 3) the model's next step
                self._step(run)
        finally:
            _current_run.reset(token)
        if run.status != "paused":
            self._record(run, "end", status=run.status, answer=run.answer, error=run.error)
        return run

    def _step(self, run: AgentRun) -> None:
        protocol = PROTOCOLS[run.protocol]()
        start = time.monotonic()
        try:
            message = self._complete(run, protocol)
        except ModelError as e:
            run.status, run.error = "failed", str(e)
            self._record(run, "model_error", error=str(e))
            return
        protocol = PROTOCOLS[run.protocol]()  # the request may have switched protocols
        turn = protocol.parse(message)
        run.steps += 1
        run.messages.append(turn.message)
        self._record(run, "model", content=turn.content, calls=[c.to_dict() for c in turn.calls], answer=turn.answer,
                     format_error=turn.error, duration_s=round(time.monotonic() - start, 3))
        if turn.error is not None:
            run.errors_in_a_row += 1
            run.messages.append(protocol.correction_message(turn.error))
            self._check_errors(run, turn.error)
        elif turn.calls:
            run.pending = list(turn.calls)
        else:
            run.status, run.answer = "done", turn.answer

    def _complete(self, run: AgentRun, protocol: Any) -> Any:
        """The model's reply message; under protocol="auto", a first request whose `tools` the server
        rejects is retried once with the text protocol."""
        import openai

        tools = list(self.tools.values())
        try:
            response = self.client.chat.completions.create(
                model=self._model_name(), messages=run.messages, temperature=self.temperature,
                max_tokens=self.max_tokens, **protocol.request_options(tools))
        except openai.APIStatusError as e:
            detail = _error_message(e)
            if self.protocol == "auto" and run.protocol == "native" and run.steps == 0 and tools and "tool" in detail.lower():
                run.protocol, run.messages = "text", self._first_messages("text", run.task)
                self._record(run, "protocol", protocol="text", reason=f"the server rejected native tool calls: {detail}")
                return self._complete(run, PROTOCOLS["text"]())
            raise ModelError(f"the model server answered {e.status_code}: {detail}") from None
        except openai.APIError as e:
            raise ModelError(f"cannot get a reply from the model server at {self._where()}: {e}") from None
        if not response.choices:
            raise ModelError("the model server returned no choices")
        return response.choices[0].message

    def _execute(self, run: AgentRun, call: ToolCall) -> None:
        protocol = PROTOCOLS[run.protocol]()
        tool = self.tools.get(call.name)
        start = time.monotonic()
        try:
            if tool is None:
                raise ToolFailure("unknown_tool", f"unknown tool {call.name!r}; the tools are: {', '.join(self.tools) or 'none'}")
            text = tool.call(call.arguments)
        except ToolFailure as failure:
            run.errors_in_a_row += 1
            observation = f"error: {failure}"
            self._record(run, "tool_error", call=call.to_dict(), kind=failure.kind, error=str(failure),
                         duration_s=round(time.monotonic() - start, 3))
        else:
            run.errors_in_a_row = 0
            observation = text if len(text) <= self.max_observation_chars else \
                text[: self.max_observation_chars] + f"\n[truncated: {len(text):,} characters in all]"
            self._record(run, "tool", call=call.to_dict(), result=text, duration_s=round(time.monotonic() - start, 3))
        run.messages.append(protocol.result_message(call, observation))

    def _check_errors(self, run: AgentRun, last: str | None = None) -> None:
        if run.errors_in_a_row >= self.max_errors_in_a_row:
            last = last or next((r["error"] for r in reversed(run.trace) if r["type"] == "tool_error"), "")
            run.status = "failed"
            run.error = f"stopped after {run.errors_in_a_row} errors in a row; the last: {last}"

    # ------------------------------------------------------------------ helpers
    def _first_messages(self, protocol: str, task: str) -> list[dict]:
        system = PROTOCOLS[protocol]().system_prompt(self.system_prompt, list(self.tools.values()))
        return [{"role": "system", "content": system}, {"role": "user", "content": task}]

    def _model_name(self) -> str:
        if self.model_name is None:
            import openai

            try:
                models = self.client.models.list().data
            except openai.APIError as e:
                raise ModelError(f"cannot list the models at {self._where()}: {e}") from None
            if not models:
                raise ModelError(f"the server at {self._where()} serves no models")
            self.model_name = models[0].id
        return self.model_name

    def _where(self) -> str:
        return str(getattr(self.client, "base_url", "the model server"))

    def _record(self, run: AgentRun, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "agent": run.agent,
                  "run_id": run.run_id, "parent_run_id": run.parent_run_id, "step": run.steps, "type": event, **fields}
        run.trace.append(record)
        if self.trace_path is not None:
            with open(self.trace_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        if self.on_record is not None:
            self.on_record(record)


def _client(model: Any, api_key: str | None, timeout_s: float) -> Any:
    if not isinstance(model, str):
        return model  # an openai.OpenAI client (or anything with .chat.completions.create and .models.list)
    try:
        import openai
    except ImportError:
        raise MissingExtraError("openai", "agents") from None
    base = model.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise InputError(f"--model must be an http(s) URL of an OpenAI-compatible server, not {model!r}")
    if not base.endswith("/v1"):
        base += "/v1"
    return openai.OpenAI(base_url=base, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                         timeout=timeout_s, max_retries=2)


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))
