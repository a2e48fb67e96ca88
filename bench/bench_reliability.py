"""Reliability of `slmkit serve` in its own process: load, abandoned clients, SIGTERM.

  load        C concurrent streaming clients send N completions (`slmkit bench serve`'s client):
              failed requests, and the server's RSS after a warm-up round and after the load.
  abandon     A streams dropped before their first token and A dropped after it, while a greedy
              bystander stream runs: the bystander's text equals the same request alone, and
              /metrics shows no request in flight and every KV block free afterwards.
  sigterm     S streams in flight when the server gets SIGTERM: every stream still ends with
              finish_reason "length" and [DONE], and the server exits 0.

The peer of each row is the stated invariant (0 failed, equal text, 0 in flight, exit 0).

    .venv/bin/python bench/bench_reliability.py --model runs/quickstart/run/final
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import gauge, rss_mb, server_process

from slmkit.serve.bench import bench_serve

BYSTANDER = {"prompt": "def main():", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}


def stream(url: str, body: dict) -> tuple[str, str | None, bool]:
    """A streamed completion: its text, last finish_reason, and whether [DONE] came."""
    text, reason, done = "", None, False
    with httpx.stream("POST", url + "/v1/completions", json={"model": model_name(url), **body}, timeout=120) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    return text, reason, done


def model_name(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def abandon(url: str, after_first_token: bool) -> None:
    """A stream closed before its response starts (the server answers headers with the first
    token), or right after its first line."""
    body = {"model": model_name(url), "prompt": "x = ", "max_tokens": 200, "stream": True, "ignore_eos": True}
    if not after_first_token:
        with httpx.Client(timeout=httpx.Timeout(30, read=0.001)) as client:
            try:
                client.post(url + "/v1/completions", json=body)
            except httpx.ReadTimeout:
                pass
        return
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        next(r.iter_lines())


def wait_idle(url: str, seconds: float = 30.0) -> tuple[float, float]:
    """(requests in flight, KV blocks used) once both are 0, or after `seconds`."""
    deadline = time.time() + seconds
    while True:
        state = gauge(url, "slmkit_requests_in_flight"), gauge(url, "slmkit_kv_blocks_used")
        if state == (0.0, 0.0) or time.time() > deadline:
            return state
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/quickstart/run/final")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--abandon", type=int, default=100, help="streams dropped before, and again after, their first token")
    ap.add_argument("--sigterm-streams", type=int, default=8)
    ap.add_argument("--out", default="bench_reliability.json")
    args = ap.parse_args()
    result: dict = {}
    with server_process(args.model, "--max-seqs", str(args.concurrency)) as (url, pid):
        # 1) load
        bench_serve(url, args.concurrency, args.concurrency, vocab_size=4096)  # warm-up
        rss_warm = rss_mb(pid)
        load = bench_serve(url, args.concurrency, args.requests, vocab_size=4096)
        result["load"] = {"requests": args.requests, "completed": load.completed, "failed": load.failed,
                          "rss_mb_after_warmup": round(rss_warm, 1), "rss_mb_after_load": round(rss_mb(pid), 1)}
        # 2) abandoned clients beside a bystander
        alone = stream(url, BYSTANDER)
        beside: list = []
        bystander = threading.Thread(target=lambda: beside.append(stream(url, BYSTANDER)))
        bystander.start()
        for i in range(2 * args.abandon):
            abandon(url, after_first_token=i >= args.abandon)
        bystander.join()
        in_flight, blocks_used = wait_idle(url)
        result["abandon"] = {"abandoned": 2 * args.abandon, "bystander_equal_to_alone": beside[0][:2] == alone[:2],
                             "bystander_finish_reason": beside[0][1], "in_flight_after": in_flight,
                             "kv_blocks_used_after": blocks_used, "rss_mb_after": round(rss_mb(pid), 1)}
    # 3) SIGTERM with streams in flight (server_process sends SIGTERM and requires exit 0 itself)
    ends: list = []
    with server_process(args.model) as (url, pid):
        threads = [threading.Thread(target=lambda: ends.append(stream(url, BYSTANDER))) for _ in range(args.sigterm_streams)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while gauge(url, "slmkit_requests_in_flight") < args.sigterm_streams and time.time() < deadline:
            time.sleep(0.05)
        in_flight = gauge(url, "slmkit_requests_in_flight")
        start = time.perf_counter()
    for t in threads:
        t.join()
    result["sigterm"] = {"streams": args.sigterm_streams, "in_flight_at_sigterm": in_flight, "finished_length_with_done": sum(r == "length" and d for _, r, d in ends),
                         "exit_code": 0, "seconds_to_exit": round(time.perf_counter() - start, 2)}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
