"""`slmkit bench serve`: load-test an OpenAI-compatible completions endpoint.

Metrics follow vLLM's benchmark_serving:
  TTFT   time to first token: request sent -> first streamed chunk with text
  TPOT   time per output token, per request: (E2EL - TTFT) / (output tokens - 1)
  ITL    inter-token latency: the gaps between successive streamed chunks, over all requests
  E2EL   end-to-end latency: request sent -> last chunk
  request throughput = completed requests / wall time; output throughput = output tokens / wall time
Prompts are `prompt_len` random token ids (sent as a token array) and every request generates
exactly `max_tokens` tokens (`ignore_eos`), as vLLM's random dataset does.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

from slmkit.errors import InputError, MissingExtraError


@dataclass
class RequestResult:
    ok: bool
    prompt: list[int]
    text: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
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
        return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)


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


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int, headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    result = RequestResult(False, prompt)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["text"]:
                        if not result.text:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        result.text += choice["text"]
        result.e2el = time.perf_counter() - start
        result.ok = True
    except Exception as e:  # noqa: BLE001 -- a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


async def _run(url: str, prompts: list[list[int]], concurrency: int, max_tokens: int, request_rate: float,
               model: str, api_key: str | None, seed: int) -> tuple[list[RequestResult], float]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def limited(prompt: list[int]) -> RequestResult:
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
    prompts: list[list[int]] | None = None,
) -> BenchResult:
    """Send `requests` streaming completions, at most `concurrency` at a time (arriving at
    `request_rate` per second, Poisson; inf = all at once), and measure them. The model name and
    vocabulary come from GET /v1/models and the server's tokenizer size unless given."""
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("httpx", "serve") from None
    if concurrency < 1 or requests < 1 or max_tokens < 1 or (prompts is None and prompt_len < 1):
        raise InputError("concurrency, requests, prompt-len and max-tokens must be at least 1")
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        try:
            model = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise InputError(f"cannot list the models at {url}/v1/models ({e}); is the server running?") from None
    if prompts is None:
        rng = random.Random(seed)
        vocab = vocab_size or 256  # byte tokens exist in every slmkit vocabulary
        prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(requests)]
    results, duration = asyncio.run(_run(url, prompts, concurrency, max_tokens, request_rate, model, api_key, seed))
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return BenchResult(
        completed=len(done), failed=len(results) - len(done), duration_s=duration,
        request_throughput=len(done) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(output_tokens + sum(len(r.prompt) for r in done)) / duration,
        ttft_ms=summarize([r.ttft for r in done]), tpot_ms=summarize(tpots),
        itl_ms=summarize([x for r in done for x in r.itl]), e2el_ms=summarize([r.e2el for r in done]),
        results=results,
    )
