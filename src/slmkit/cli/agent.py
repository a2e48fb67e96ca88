"""`slmkit agent run` and `slmkit agent resume`: an agent with built-in tools over an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from slmkit.errors import InputError

PAUSED_EXIT = 3


def _retriever(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InputError(f"--retriever takes MODULE:FUNCTION, not {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"--retriever {spec}: {e}") from None


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _agent(options: dict, api_key: str | None, quiet: bool):
    from slmkit.agents import Agent, builtin_tools

    tools = builtin_tools(options["tools"], root=options["root"], allowed_hosts=options["allow_host"],
                          retriever=_retriever(options["retriever"]), requires_approval=options["require_approval"])
    return Agent(options["model"], tools, model_name=options["model_name"], api_key=api_key,
                 protocol=options["protocol"], max_steps=options["max_steps"], trace=options["trace"],
                 on_record=None if quiet else _show,
                 **({"system_prompt": options["system"]} if options["system"] else {}))


def _finish(run, options: dict, state: str | None, as_json: bool) -> None:
    from slmkit._io import write_text_atomic

    if run.status == "paused":  # only tools in --require-approval pause, and those need --state
        write_text_atomic(state, json.dumps({"options": options, "run": run.to_dict()}, ensure_ascii=False, indent=1))
        call = run.awaiting
        print(f"paused: {call.name}({json.dumps(call.arguments, ensure_ascii=False)}) needs approval; saved in {state}\n"
              f"resume with: slmkit agent resume {state} --approve | --deny [REASON] | --edit JSON", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": run.status, "answer": run.answer, "error": run.error, "steps": run.steps,
                          "run_id": run.run_id}, ensure_ascii=False))
    elif run.status == "done":
        print(run.answer)
    elif run.status != "paused":
        print(f"agent: {run.status}: {run.error}", file=sys.stderr)
    if run.status != "done":
        sys.exit(PAUSED_EXIT if run.status == "paused" else 1)


def _show(record: dict) -> None:
    """Tool calls and errors on stderr as they happen."""
    if record["type"] == "tool":
        print(f"  {record['call']['name']}({json.dumps(record['call']['arguments'], ensure_ascii=False)}) -> "
              f"{record['result'][:200]}", file=sys.stderr)
    elif record["type"] in ("tool_error", "model_error", "protocol"):
        print(f"  {record['type']}: {record.get('error') or record.get('reason')}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> None:
    options = {"model": args.model, "model_name": args.model_name, "tools": _names(args.tools), "root": args.root,
               "allow_host": args.allow_host, "retriever": args.retriever,
               "require_approval": _names(args.require_approval), "max_steps": args.max_steps,
               "protocol": args.protocol, "system": args.system, "trace": args.trace}
    if options["require_approval"] and args.state is None:
        raise InputError("--require-approval needs --state FILE, where a paused run is saved for `slmkit agent resume`")
    for key in ("root", "trace"):  # a resume may run from another folder
        if options[key] is not None:
            options[key] = str(Path(options[key]).resolve())
    run = _agent(options, args.api_key, args.quiet).run(args.task)
    _finish(run, options, args.state, args.json)


def cmd_resume(args: argparse.Namespace) -> None:
    from slmkit._io import read_json
    from slmkit.agents import AgentRun

    saved = read_json(args.state)
    if not isinstance(saved, dict) or "options" not in saved or "run" not in saved:
        raise InputError(f"{args.state} is not a state file written by `slmkit agent run --state`")
    options, run = saved["options"], AgentRun.from_dict(saved["run"])
    arguments = None
    if args.edit is not None:
        try:
            arguments = json.loads(args.edit)
        except json.JSONDecodeError as e:
            raise InputError(f"--edit takes the call's new arguments as JSON: {e}") from None
    decision = "approve" if args.approve else "deny" if args.deny is not None else "edit" if args.edit is not None else None
    if args.trace is not None:
        options["trace"] = str(Path(args.trace).resolve())
    run = _agent(options, args.api_key, args.quiet).resume(run, decision, arguments=arguments, reason=args.deny or None)
    _finish(run, options, args.state, args.json)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.agents.toolbox import BUILTIN

    p = commands.add_parser("agent", help="run a tool-using agent over an OpenAI-compatible server",
                            description="A ReAct-style agent: the model calls tools until it answers. It uses the "
                                        "server's native tool calls when the server takes them, else a JSON-per-step "
                                        "text protocol.")
    sub = p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser("run", parents=[common], help="run a task",
                       description="Run TASK and print the final answer; tool calls go to stderr as they happen. "
                                   "Exit status 0 when answered, 1 when stopped (step cap, errors, server), "
                                   f"{PAUSED_EXIT} when paused for approval (state saved in --state).")
    r.add_argument("task", help="what to do")
    r.add_argument("--model", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000 (slmkit serve, "
                                                                 "llama.cpp's server, vLLM)")
    r.add_argument("--model-name", metavar="NAME", help="model to ask for (default: the first the server lists)")
    r.add_argument("--tools", default="calculator", metavar="NAMES",
                   help=f"comma-separated built-in tools: {', '.join(BUILTIN)} (default: calculator)")
    r.add_argument("--root", metavar="DIR", help="the folder read_file may read (default: the current directory)")
    r.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="a host http_fetch may fetch from (repeat; '*' for any); http_fetch is off without one")
    r.add_argument("--retriever", metavar="MODULE:FUNCTION", help="search_docs' retriever: a callable (query, k) -> passages")
    r.add_argument("--require-approval", default="", metavar="NAMES",
                   help="comma-separated tools that pause the run until approved (needs --state)")
    r.add_argument("--state", metavar="FILE", help="where a paused run is saved")
    r.add_argument("--max-steps", type=int, default=10, metavar="N", help="model steps before giving up (default: 10)")
    r.add_argument("--protocol", choices=["auto", "native", "text"], default="auto",
                   help="native OpenAI tool calls, the text protocol, or auto: native unless the server rejects it")
    r.add_argument("--system", metavar="PROMPT", help="system prompt (the tool list is added for the text protocol)")
    r.add_argument("--trace", metavar="FILE", help="append every step to this JSONL file")
    r.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $OPENAI_API_KEY)")
    r.add_argument("--json", action="store_true", help="print status, answer and error as JSON")
    r.set_defaults(handler=cmd_run)

    s = sub.add_parser("resume", parents=[common], help="resume a run paused for approval",
                       description="Load a run saved by `agent run --state`, apply the decision on the call awaiting "
                                   "approval and continue. A failed run resumes without a decision (a retry).")
    s.add_argument("state", metavar="STATE", help="the --state file")
    decision = s.add_mutually_exclusive_group()
    decision.add_argument("--approve", action="store_true", help="run the call as the model asked")
    decision.add_argument("--deny", nargs="?", const="", metavar="REASON", help="refuse it; the reason is shown to the model")
    decision.add_argument("--edit", metavar="JSON", help="run it with these arguments instead")
    s.add_argument("--trace", metavar="FILE", help="append every step to this JSONL file (default: the run's --trace)")
    s.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $OPENAI_API_KEY)")
    s.add_argument("--json", action="store_true", help="print status, answer and error as JSON")
    s.set_defaults(handler=cmd_resume)
