"""The agent loop against a scripted OpenAI-compatible upstream on loopback (the official openai client
in between): native tool calls, the text protocol, tool errors, approval, sub-agents, the CLI."""

from __future__ import annotations

import json
import time
from enum import Enum
from typing import Literal

import pytest

pytest.importorskip("openai")
pytest.importorskip("pydantic")

from agent_upstream import ScriptedUpstream, call
from slmkit.agents import Agent, AgentRun, TextProtocol, Tool, ToolFailure, calculator_tool, tool
from slmkit.cli import main
from slmkit.errors import InputError


def text_step(**obj) -> str:
    return json.dumps(obj)


def last_user_or_tool(request: dict) -> str:
    return request["messages"][-1]["content"]


# ---------------------------------------------------------------------------- native tool calls
def test_native_tool_call_then_answer_with_trace(tmp_path):
    trace = tmp_path / "trace.jsonl"
    with ScriptedUpstream([{"tool_calls": [call("calculator", {"expression": "17 * 23"}, "c1")]}, "It is 391."]) as up:
        run = Agent(up.url, [calculator_tool()], trace=trace).run("What is 17 times 23?")
    assert (run.status, run.answer, run.steps) == ("done", "It is 391.", 2)
    first, second = up.requests
    assert first["model"] == "scripted" and first["tool_choice"] == "auto"
    assert first["tools"][0]["function"]["name"] == "calculator"
    assert first["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    assert second["messages"][-2]["tool_calls"][0]["id"] == "c1"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "391"}
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["type"] for r in records] == ["start", "model", "tool", "model", "end"]
    assert records == run.trace
    assert records[2]["result"] == "391" and records[-1]["answer"] == "It is 391."
    assert len({r["run_id"] for r in records}) == 1


def test_parallel_calls_run_in_order_and_each_gets_its_result():
    with ScriptedUpstream([{"tool_calls": [call("calculator", {"expression": "1+1"}, "a"),
                                           call("calculator", {"expression": "2*5"}, "b")]}, "2 and 10"]) as up:
        run = Agent(up.url, [calculator_tool()], protocol="native").run("two sums")
    assert run.status == "done"
    assert up.requests[1]["messages"][-2:] == [{"role": "tool", "tool_call_id": "a", "content": "2"},
                                                {"role": "tool", "tool_call_id": "b", "content": "10"}]


# ---------------------------------------------------------------------------- text protocol
def test_auto_falls_back_to_the_text_protocol_when_the_server_rejects_tools():
    replies = [text_step(thought="multiply", tool="calculator", arguments={"expression": "17*23"}),
               text_step(answer="391")]
    with ScriptedUpstream(replies, native=False) as up:
        run = Agent(up.url, [calculator_tool()]).run("What is 17 times 23?")
    assert (run.status, run.answer, run.protocol) == ("done", "391", "text")
    rejected, first, second = up.requests
    assert "tools" in rejected and "tools" not in first and "tools" not in second
    system = first["messages"][0]["content"]
    assert "calculator" in system and '"expression"' in system and '"answer"' in system
    assert second["messages"][-1] == {"role": "user", "content": "Observation from calculator: 391"}
    assert [r["type"] for r in run.trace if r["type"] == "protocol"] == ["protocol"]


@pytest.mark.parametrize("reply, expected", [
    ('{"tool": "calculator", "arguments": {"expression": "2+2"}}', ("calculator", {"expression": "2+2"})),
    ('Sure!\n```json\n{"thought": "add", "tool": "calculator", "arguments": {"expression": "2+2"}}\n```\nDone.',
     ("calculator", {"expression": "2+2"})),
    ('{"name": "calculator", "arguments": "{\\"expression\\": \\"2+2\\"}"}', ("calculator", '{"expression": "2+2"}')),
    ('<tool_call>{"name": "calculator", "parameters": {"expression": "2+2"}}</tool_call>', ("calculator", {"expression": "2+2"})),
    ('{"action": "calculator", "action_input": "2+2"}', ("calculator", "2+2")),
    ('{"function": {"name": "calculator", "arguments": {"expression": "2+2"}}}', ("calculator", {"expression": "2+2"})),
    ('{"answer": "4"}', "4"),
    ('{"thought": "easy", "final_answer": 4}', "4"),
    ('{"action": "Final Answer", "action_input": "four"}', "four"),
    ("The answer is 4.", "The answer is 4."),
])
def test_text_protocol_reads_what_small_models_write(reply, expected):
    class Message:
        content = reply
    turn = TextProtocol().parse(Message())
    assert turn.error is None
    if isinstance(expected, tuple):
        assert [(c.name, c.arguments) for c in turn.calls] == [expected]
    else:
        assert (turn.calls, turn.answer) == ([], expected)


@pytest.mark.parametrize("reply", ['{"tool": "calculator", "arguments": {"expression": "2+', '{"thought": "hmm"}'])
def test_text_protocol_format_errors_are_shown_to_the_model(reply):
    with ScriptedUpstream([reply, text_step(answer="4")]) as up:
        run = Agent(up.url, [calculator_tool()], protocol="text").run("2+2?")
    assert (run.status, run.answer, run.steps) == ("done", "4", 2)
    assert last_user_or_tool(up.requests[1]).startswith("Format error:")
    assert run.trace[1]["format_error"]


# ---------------------------------------------------------------------------- bad input: tool errors
def test_a_tool_that_raises_is_shown_to_the_model_which_retries():
    attempts = []

    @tool
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        attempts.append((a, b))
        return a / b

    replies = [{"tool_calls": [call("divide", {"a": 1, "b": 0})]}, {"tool_calls": [call("divide", {"a": 1, "b": 4})]}, "0.25"]
    with ScriptedUpstream(replies) as up:
        run = Agent(up.url, [divide]).run("1/4")
    assert (run.status, run.answer) == ("done", "0.25")
    assert attempts == [(1.0, 0.0), (1.0, 4.0)]
    assert up.requests[1]["messages"][-1]["content"] == "error: divide raised ZeroDivisionError: float division by zero"
    assert up.requests[2]["messages"][-1]["content"] == "0.25"
    assert [r["kind"] for r in run.trace if r["type"] == "tool_error"] == ["error"]


def test_a_tool_that_hangs_times_out_and_the_run_goes_on():
    @tool(timeout_s=0.5)
    def wait_forever(seconds: int) -> str:
        """Sleep."""
        time.sleep(seconds)
        return "woke"

    start = time.monotonic()
    with ScriptedUpstream([{"tool_calls": [call("wait_forever", {"seconds": 60})]}, "gave up waiting"]) as up:
        run = Agent(up.url, [wait_forever]).run("wait")
    assert time.monotonic() - start < 10
    assert (run.status, run.answer) == ("done", "gave up waiting")
    assert up.requests[1]["messages"][-1]["content"] == "error: wait_forever did not finish within 0.5 s"
    assert [r["kind"] for r in run.trace if r["type"] == "tool_error"] == ["timeout"]


def test_an_unknown_tool_name_is_an_error_naming_the_tools():
    replies = [{"tool_calls": [call("calculater", {"expression": "1+1"})]}, {"tool_calls": [call("calculator", "1+1")]}, "2"]
    with ScriptedUpstream(replies) as up:
        run = Agent(up.url, [calculator_tool()]).run("1+1")
    assert run.status == "done"
    assert up.requests[1]["messages"][-1]["content"] == "error: unknown tool 'calculater'; the tools are: calculator"
    assert up.requests[2]["messages"][-1]["content"] == "2"


@pytest.mark.parametrize("arguments, fragment", [
    ({"expresion": "1+1"}, "expression: Field required; expresion: Extra inputs are not permitted"),
    ({"expression": ["1+1"]}, "expression: Input should be a valid string"),
    ("not json {", None),
])
def test_invalid_arguments_are_errors_the_model_sees(arguments, fragment):
    with ScriptedUpstream([{"tool_calls": [call("calculator", arguments)]}, "sorry"]) as up:
        run = Agent(up.url, [calculator_tool()]).run("1+1")
    shown = up.requests[1]["messages"][-1]["content"]
    assert run.status == "done"
    if fragment is None:  # a bare string goes to the only parameter, and the calculator refuses it
        assert shown.startswith("error: calculator raised ValueError: not an arithmetic expression")
    else:
        assert shown == f"error: invalid arguments for calculator: {fragment}"


def test_errors_in_a_row_stop_the_run_with_everything_kept_and_it_can_be_retried():
    bad = {"tool_calls": [call("nope", {})]}
    with ScriptedUpstream([bad, bad, bad, "recovered"]) as up:
        agent = Agent(up.url, [calculator_tool()], max_errors_in_a_row=3)
        run = agent.run("x")
        assert run.status == "failed" and "3 errors in a row" in run.error and "unknown tool 'nope'" in run.error
        assert len(run.messages) == 2 + 3 * 2 and run.trace[-1]["type"] == "end"
        run = agent.resume(run)
    assert (run.status, run.answer) == ("done", "recovered")


def test_step_cap():
    again = {"tool_calls": [call("calculator", {"expression": "1"})]}
    with ScriptedUpstream([again] * 5) as up:
        run = Agent(up.url, [calculator_tool()], max_steps=3).run("loop")
    assert (run.status, run.steps, len(up.requests)) == ("max_steps", 3, 3)
    assert run.error == "no answer within 3 model steps"


def test_an_unreachable_server_fails_the_run_cleanly():
    run = Agent("http://127.0.0.1:9", [calculator_tool()], model_name="m", timeout_s=2).run("x")
    assert run.status == "failed" and "cannot get a reply from the model server" in run.error
    assert run.trace[-2]["type"] == "model_error"


def test_a_server_error_is_reported_not_raised():
    import openai

    with ScriptedUpstream([{"status": 503, "message": "overloaded"}]) as up:
        client = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0)  # a client works as the model too
        run = Agent(client, [calculator_tool()]).run("x")
    assert run.status == "failed" and run.error == "the model server answered 503: overloaded"


# ---------------------------------------------------------------------------- human in the loop
def make_delete_tool(deleted: list):
    @tool(requires_approval=True)
    def delete_file(path: str) -> str:
        """Delete a file."""
        deleted.append(path)
        return f"deleted {path}"
    return delete_file


@pytest.mark.parametrize("decision, arguments, reason, ran, shown", [
    ("approve", None, None, ["a.txt"], "deleted a.txt"),
    ("edit", {"path": "b.txt"}, None, ["b.txt"], "deleted b.txt"),
    ("deny", None, "keep it", [], "The user denied this call. Reason: keep it"),
])
def test_approval_pauses_and_the_state_resumes_in_a_new_agent(decision, arguments, reason, ran, shown):
    deleted: list = []
    with ScriptedUpstream([{"tool_calls": [call("delete_file", {"path": "a.txt"}, "d1")]}, "finished"]) as up:
        run = Agent(up.url, [make_delete_tool(deleted)]).run("clean up")
        assert run.status == "paused" and run.awaiting.name == "delete_file" and deleted == []
        saved = run.to_json()
        restored = AgentRun.from_json(saved)
        fresh = Agent(up.url, [make_delete_tool(deleted)])
        run = fresh.resume(restored, decision, arguments=arguments, reason=reason)
    assert (run.status, run.answer) == ("done", "finished")
    assert deleted == ran
    assert up.requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "d1", "content": shown}
    assert [r["type"] for r in run.trace] == ["start", "model", "paused", "approval"] + \
        (["tool"] if ran else []) + ["model", "end"]


def test_resume_refuses_wrong_decisions():
    deleted: list = []
    with ScriptedUpstream([{"tool_calls": [call("delete_file", {"path": "a.txt"})]}]) as up:
        agent = Agent(up.url, [make_delete_tool(deleted)])
        run = agent.run("clean up")
        with pytest.raises(InputError, match="needs a decision"):
            agent.resume(run)
        with pytest.raises(InputError, match="edit needs the new arguments"):
            agent.resume(run, "edit")
    with pytest.raises(InputError, match="not an agent run state"):
        AgentRun.from_json('{"task": "x"}')


# ---------------------------------------------------------------------------- agents as tools
def test_an_agent_is_a_tool_of_another():
    with ScriptedUpstream([{"tool_calls": [call("calculator", {"expression": "6*7"})]}, "42"]) as sub_up, \
            ScriptedUpstream([{"tool_calls": [call("math_helper", {"task": "what is 6*7?"})]}, "The helper says 42."]) as up:
        helper_records: list = []
        helper = Agent(sub_up.url, [calculator_tool()], name="math_helper", on_record=helper_records.append)
        boss = Agent(up.url, [helper])
        run = boss.run("ask the helper")
    assert (run.status, run.answer) == ("done", "The helper says 42.")
    assert up.requests[0]["tools"][0]["function"]["name"] == "math_helper"
    assert up.requests[1]["messages"][-1]["content"] == "42"
    assert sub_up.requests[0]["messages"][-1] == {"role": "user", "content": "what is 6*7?"}
    assert run.trace[2]["type"] == "tool" and run.trace[2]["result"] == "42"
    assert [r["type"] for r in helper_records] == ["start", "model", "tool", "model", "end"]
    assert {(r["agent"], r["parent_run_id"]) for r in helper_records} == {("math_helper", run.run_id)}


# ---------------------------------------------------------------------------- schemas from functions
class Unit(Enum):
    celsius = "C"
    fahrenheit = "F"


def test_schemas_come_from_signatures_and_docstrings():
    @tool
    def weather(city: str, days: int = 1, unit: Unit = Unit.celsius, detail: Literal["short", "long"] = "short",
                tags: list[str] | None = None) -> dict:
        """Forecast for a city.

        Args:
            city: the city's name, e.g. "Paris".
            days (int): how many days,
                from 1 to 7.
        """
        return {"city": city, "days": days, "unit": unit.value, "detail": detail, "tags": tags}

    params = weather.parameters
    assert weather.description == "Forecast for a city."
    assert params["required"] == ["city"] and params["additionalProperties"] is False
    assert params["properties"]["city"] == {"type": "string", "description": 'the city\'s name, e.g. "Paris".'}
    assert params["properties"]["days"] == {"type": "integer", "default": 1, "description": "how many days, from 1 to 7."}
    assert params["properties"]["detail"]["enum"] == ["short", "long"]
    assert "title" not in json.dumps(params)
    assert json.loads(weather.call({"city": "Oslo", "days": "3", "unit": "F"})) == \
        {"city": "Oslo", "days": 3, "unit": "F", "detail": "short", "tags": None}
    with pytest.raises(ToolFailure, match="detail: Input should be 'short' or 'long'"):
        weather.call({"city": "Oslo", "detail": "medium"})


def test_functions_without_types_or_with_bad_names_are_refused():
    def untyped(x):
        return x
    with pytest.raises(InputError, match="parameter x has no type annotation"):
        tool(untyped)
    with pytest.raises(InputError, match="tool name 'two words'"):
        Tool("two words", "", {"type": "object"}, print)
    with pytest.raises(InputError, match="two tools are named 'calculator'"):
        Agent("http://127.0.0.1:9", [calculator_tool(), calculator_tool()])


# ---------------------------------------------------------------------------- the CLI
def test_cli_agent_run_prints_the_answer_and_writes_the_trace(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    with ScriptedUpstream([{"tool_calls": [call("calculator", {"expression": "2**10"})]}, "1024"]) as up:
        code = main(["agent", "run", "What is 2 to the 10th?", "--model", up.url, "--tools", "calculator",
                     "--trace", str(trace)])
    out, err = capsys.readouterr()
    assert code == 0 and out == "1024\n"
    assert 'calculator({"expression": "2**10"}) -> 1024' in err
    assert [json.loads(line)["type"] for line in trace.read_text().splitlines()][-1] == "end"


def test_cli_approval_pauses_to_a_state_file_and_resumes(tmp_path, capsys):
    state = tmp_path / "state.json"
    (tmp_path / "notes.txt").write_text("secret plans")
    replies = [{"tool_calls": [call("read_file", {"path": "notes.txt"})]}, "It says: secret plans"]
    with ScriptedUpstream(replies) as up:
        with pytest.raises(SystemExit) as paused:
            main(["agent", "run", "read my notes", "--model", up.url, "--tools", "read_file", "--root", str(tmp_path),
                  "--require-approval", "read_file", "--state", str(state)])
        assert paused.value.code == 3
        assert "paused: read_file" in capsys.readouterr().err
        assert json.loads(state.read_text())["run"]["status"] == "paused"
        code = main(["agent", "resume", str(state), "--approve"])
    assert code == 0 and capsys.readouterr().out == "It says: secret plans\n"
    assert up.requests[1]["messages"][-1]["content"] == "secret plans"


@pytest.mark.parametrize("argv, fragment", [
    (["--tools", "calculator,pythn"], "unknown tool 'pythn' (did you mean 'python'?)"),
    (["--tools", "http_fetch"], "http_fetch is off by default"),
    (["--tools", "search_docs"], "search_docs needs a retriever"),
    (["--require-approval", "calculator"], "--require-approval needs --state FILE"),
    (["--retriever", "nomodule"], "--retriever takes MODULE:FUNCTION"),
])
def test_cli_agent_bad_options_are_one_line_errors(argv, fragment, capsys):
    code = main(["agent", "run", "x", "--model", "http://127.0.0.1:9"] + argv)
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- a real model behind slmkit serve
@pytest.mark.real_model
def test_smollm2_behind_slmkit_serve_runs_the_text_protocol_to_the_end(smollm2):
    """SmolLM2-135M almost never calls the calculator (0 of 10 questions, BENCHMARKS.md "Agents"), so this
    checks the real server's side of the loop, not the model's skill: `slmkit serve` refuses native tool
    calls, the agent switches to the text protocol, every step is traced and the run ends cleanly."""
    pytest.importorskip("fastapi")
    from slmkit.serve.server import build_app, running

    with running(build_app(smollm2, max_seqs=2, kv_blocks=256)) as url:
        run = Agent(url, [calculator_tool()], max_steps=2, max_tokens=48).run("What is 17 times 23? Use the calculator.")
    assert run.protocol == "text" and run.status in ("done", "max_steps")
    types = [r["type"] for r in run.trace]
    assert types[:2] == ["start", "protocol"] and types[-1] == "end" and types.count("model") == run.steps >= 1
    assert "unsupported field" in run.trace[1]["reason"] and "'tools'" in run.trace[1]["reason"]
    assert "calculator" in run.messages[0]["content"] and run.messages[1]["content"].startswith("What is 17 times 23?")
    assert all(isinstance(r["content"], str) and r["content"] for r in run.trace if r["type"] == "model")
