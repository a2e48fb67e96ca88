"""Agent benchmark: does a model behind `slmkit serve` use the calculator to answer arithmetic questions?

The model directory is served in-process (`slmkit.serve.server.running`); an `Agent` with the
calculator tool and protocol "auto" (the server refuses native tool calls, so the text protocol)
answers each question greedily within --max-steps. Reported per question and in all: whether the
calculator was called, whether a call returned the right value, and whether the final answer's last
number is the right value.

    slmkit convert from-gguf smollm2-135m-instruct --out models/smollm2
    .venv/bin/python bench/bench_agent.py models/smollm2 [--max-steps 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from slmkit.agents import Agent, calculator_tool
from slmkit.serve.server import build_app, running

QUESTIONS = [("What is 17 times 23?", 391), ("What is 1234 plus 5678?", 6912), ("What is 144 divided by 12?", 12),
             ("What is 25 squared?", 625), ("What is 999 minus 123?", 876), ("What is 36 times 47?", 1692),
             ("What is 7 to the power of 5?", 16807), ("What is 3456 divided by 8?", 432),
             ("What is 89 plus 76 times 2?", 241), ("What is 1000 minus 1?", 999)]


def last_number(text: str | None) -> float | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", (text or "").replace(",", ""))
    return float(numbers[-1]) if numbers else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per model step (default: 96)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows = []
    with running(build_app(args.model, max_seqs=2, kv_blocks=256)) as url:
        for question, expected in QUESTIONS:
            start = time.perf_counter()
            run = Agent(url, [calculator_tool()], max_steps=args.max_steps, max_tokens=args.max_tokens).run(question)
            calls = [r for r in run.trace if r["type"] == "tool"]
            rows.append({"question": question, "status": run.status, "protocol": run.protocol, "steps": run.steps,
                         "called": bool(calls), "right_call": any(last_number(r["result"]) == expected for r in calls),
                         "correct": run.status == "done" and last_number(run.answer) == expected,
                         "answer": (run.answer or run.error or "")[:60], "seconds": round(time.perf_counter() - start, 1)})
    summary = {k: sum(r[k] for r in rows) for k in ("called", "right_call", "correct")}
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary, "n": len(rows)}, indent=2))
        return
    print("| question | status | steps | calculator called | right call | answer correct | answer |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['question']} | {r['status']} | {r['steps']} | {'yes' if r['called'] else 'no'} | "
              f"{'yes' if r['right_call'] else 'no'} | {'yes' if r['correct'] else 'no'} | {r['answer']!r} |")
    n = len(rows)
    print(f"\ncalculator called {summary['called']}/{n}, right call {summary['right_call']}/{n}, "
          f"answer correct {summary['correct']}/{n} (protocol: {rows[0]['protocol']})")


if __name__ == "__main__":
    main()
