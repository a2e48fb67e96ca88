"""`slmkit bench serve`: load-test an OpenAI-compatible completions endpoint: slmkit's own server,
or another one (llama-cpp-python's, vLLM, ...).

Metrics follow vLLM's benchmark_serving:
  TTFT   time to first token: request sent -> first streamed chunk with text
  TPOT   time per output token, per request: (E2EL - TTFT) / (output tokens - 1)
  ITL    inter-token latency: the gaps between successive streamed chunks, over all requests
  E2EL   end-to-end latency: request sent -> last chunk
  request throughput = completed requests / wall time; output throughput = output tokens / wall time
Every request asks for exactly `max_tokens` tokens (`ignore_eos`), as vLLM's random dataset does.
Prompts are `prompt_len` random token ids (sent as a token array) for slmkit, whose byte tokens
exist in every vocabulary; other servers, some of which take only text (llama-cpp-python's
answers token arrays with a 500), get `prompt_len` random common English words, about one token
each. Output tokens are the usage chunk's count when the server sends one, else one per streamed
chunk with text (servers stream one token per chunk). A failed request keeps its reason: the
status code and the server's error message, or the transport error; the result groups them.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from slmkit.errors import InputError, MissingExtraError

PROMPT_KINDS = ("auto", "ids", "text")
# common English words that most BPE vocabularies hold as one token (with their leading space)
WORDS = ("the of and to in is was for on that with as by at from his her they this which have not are "
         "one all were when there been their time would could more other about people over first after "
         "water world house city river music light night story work school family hand place year day "
         "small great old new long good high little large young early right open green black white red "
         "walk write read talk build carry bring hold keep leave start turn move live play run look").split()


@dataclass
class RequestResult:
    ok: bool
    prompt: list[int] | str
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0  # the usage chunk's count; else the ids sent, or the words sent (an estimate)
    counted_by: str = "chunks"  # how output_tokens was counted: "usage" or "chunks"
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    status: int | None = None  # HTTP status of a failed request (None: no response)
    error: str = ""


@dataclass
class BenchResult:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2el_ms: dict[str, float]
    prompt_kind: str = "ids"
    output_tokens_counted_by: dict[str, int] = field(default_factory=dict)  # "usage" / "chunks" -> requests
    failures: list[dict] = field(default_factory=list)  # {"status", "error", "count"}, most frequent first
    results: list[RequestResult] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("results")
        return d

    def table(self) -> str:
        rows = [("completed / failed requests", f"{self.completed} / {self.failed}"),
                ("duration (s)", f"{self.duration_s:.2f}"),
                ("request throughput (req/s)", f"{self.request_throughput:.2f}"),
                ("output throughput (tok/s)", f"{self.output_throughput:.1f}"),
                ("total token throughput (tok/s)", f"{self.total_token_throughput:.1f}")]
        for name, stats in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("ITL", self.itl_ms), ("E2EL", self.e2el_ms)):
            rows += [(f"{name} {k} (ms)", f"{v:.2f}") for k, v in stats.items()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value:>12}" for name, value in rows]
        lines += [f"failed x{f['count']}: {'HTTP ' + str(f['status']) + ': ' if f['status'] else ''}{f['error']}"
                  for f in self.failures]
        return "\n".join(lines)


def group_failures(results: list[RequestResult]) -> list[dict]:
    """Failed requests grouped by status and the first line of their error (servers that echo the
    input in the rest of the message still group), most frequent first; each with one example."""
    groups: dict[tuple, dict] = {}
    for r in results:
        if not r.ok:
            key = (r.status, r.error.strip().split("\n", 1)[0][:80])
            group = groups.setdefault(key, {"status": r.status, "error": " ".join(r.error.split())[:200], "count": 0})
            group["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def error_message(body: bytes | dict) -> str:
    """An error's message, at most 500 characters: OpenAI's {"error": {"message"}} (llama.cpp's
    and vLLM's too), a bare {"error": "..."} or {"detail": ...}, else the body's text."""
    payload: object = body
    if isinstance(body, bytes):
        text = body.decode(errors="replace")
        try:
            payload = json.loads(text)
        except ValueError:
            payload = text
    if isinstance(payload, dict):
        payload = payload.get("error", payload.get("detail", payload))
        if isinstance(payload, dict):
            payload = payload.get("message", payload)
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return text.strip()[:500] or "(empty response)"


def summarize(values: list[float]) -> dict[str, float]:
    """mean, median and p95/p99 in milliseconds (0 for no values)."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    ms = sorted(v * 1000 for v in values)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(ms) - 1) * p / 100
        lo = int(k)
        return ms[lo] + (ms[min(lo + 1, len(ms) - 1)] - ms[lo]) * (k - lo)

    return {"mean": statistics.fmean(ms), "p50": pct(50), "p95": pct(95), "p99": pct(99)}


async def _one(client, url: str, model: str, prompt: list[int] | str, max_tokens: int, headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    result = RequestResult(False, prompt, prompt_tokens=len(prompt) if isinstance(prompt, list) else len(prompt.split()))
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.status, result.error = r.status_code, error_message(await r.aread())
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = time.perf_counter()
                if chunk.get("error"):  # an error after the stream began (slmkit's, llama.cpp's)
                    result.status = 200
                    result.error = "in the stream: " + error_message(chunk)
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.output_tokens, result.counted_by = usage["completion_tokens"], "usage"
                    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if not result.text:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        result.text += choice["text"]
                        chunks += 1
        result.e2el = time.perf_counter() - start
        if result.counted_by == "chunks":
            result.output_tokens = chunks
        result.ok = bool(result.text)
        if not result.ok:
            result.status, result.error = 200, "the stream ended without any text"
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _run(url: str, prompts: list[list[int]] | list[str], concurrency: int, max_tokens: int, request_rate: float,
               model: str, api_key: str | None, seed: int) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def limited(prompt: list[int] | str) -> RequestResult:
            async with limit:
                return await _one(client, url, model, prompt, max_tokens, headers)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def bench_serve(
    url: str,
    concurrency: int = 32,
    requests: int = 200,
    prompt_len: int = 32,
    max_tokens: int = 32,
    request_rate: float = float("inf"),
    model: str | None = None,
    api_key: str | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    prompts: list[list[int]] | list[str] | None = None,
    prompt_kind: str = "auto",
) -> BenchResult:
    """Send `requests` streaming completions, at most `concurrency` at a time (arriving at
    `request_rate` per second, Poisson; inf = all at once), and measure them. The model name comes
    from GET /v1/models unless given. `prompt_kind`: "ids" (random ids below `vocab_size`, default
    256), "text" (random words), or "auto": ids when the server is slmkit (its /v1/models says
    owned_by "slmkit"), text otherwise. `prompts` replaces the random ones."""
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("httpx", "serve") from None
    if concurrency < 1 or requests < 1 or max_tokens < 1 or (prompts is None and prompt_len < 1):
        raise InputError("concurrency, requests, prompt-len and max-tokens must be at least 1")
    if prompt_kind not in PROMPT_KINDS:
        raise InputError(f"the prompt kind must be one of {', '.join(PROMPT_KINDS)}, not {prompt_kind!r}")
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    models, problem = [], "it lists none"
    try:
        listed = httpx.get(url + "/v1/models", headers=headers, timeout=30)
        if listed.status_code == 200:
            models = [m for m in listed.json()["data"] if isinstance(m, dict) and "id" in m]
        else:
            problem = f"HTTP {listed.status_code}: {error_message(listed.content)}"
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if model is None:
        if not models:
            raise InputError(f"cannot list the models at {url}/v1/models ({problem}); is the server running? "
                             "(or give --model)")
        model = models[0]["id"]
    if prompts is None:
        if prompt_kind == "auto":
            slmkit = any(m["id"] == model and m.get("owned_by") == "slmkit" for m in models)
            prompt_kind = "ids" if slmkit else "text"
        rng = random.Random(seed)
        vocab = vocab_size or 256  # byte tokens exist in every slmkit vocabulary
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] if prompt_kind == "ids" else
                   " ".join(rng.choice(WORDS) for _ in range(prompt_len)) for _ in range(requests)]
    else:
        prompt_kind = "text" if prompts and isinstance(prompts[0], str) else "ids"
    results, duration = asyncio.run(_run(url, prompts, concurrency, max_tokens, request_rate, model, api_key, seed))
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return BenchResult(
        completed=len(done), failed=len(results) - len(done), duration_s=duration,
        request_throughput=len(done) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(output_tokens + sum(r.prompt_tokens for r in done)) / duration,
        ttft_ms=summarize([r.ttft for r in done]), tpot_ms=summarize(tpots),
        itl_ms=summarize([x for r in done for x in r.itl]), e2el_ms=summarize([r.e2el for r in done]),
        prompt_kind=prompt_kind, output_tokens_counted_by=dict(Counter(r.counted_by for r in done)),
        failures=group_failures(results), results=results,
    )
