"""Prometheus metrics of a server: engine state read at scrape time, latencies as histograms."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from slmkit.errors import MissingExtraError
from slmkit.serve.engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, engine: Engine, in_flight: Callable[[], int] = lambda: 0, window_s: float = 10.0) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise MissingExtraError("prometheus-client", "serve") from None
        self.registry = registry = CollectorRegistry()
        gauges = {
            "requests_in_flight": ("HTTP requests admitted and not yet ended", in_flight),
            "queue_depth": ("requests waiting for a slot", lambda: len(engine.waiting)),
            "running_sequences": ("sequences in the running batch", lambda: len(engine.running)),
            "kv_blocks_used": ("KV-cache blocks in use", lambda: engine.blocks.num_used),
            "kv_blocks_free": ("KV-cache blocks free or evictable", lambda: engine.blocks.num_free),
            "prefix_cache_hit_rate": ("full prompt blocks found in the prefix cache / looked up", lambda: engine.blocks.hit_rate),
            "tokens_per_second": (f"output tokens per second over the last {window_s:g} s", self.tokens_per_second),
            "speculative_acceptance_rate": ("draft tokens accepted / proposed (NaN without a drafter)",
                                            lambda: engine.acceptance_rate),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"slmkit_{name}", doc, registry=registry).set_function(read)
        self.ttft = Histogram("slmkit_time_to_first_token_seconds", "request arrival to first output token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("slmkit_time_per_output_token_seconds", "time between output tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.output_tokens = Counter("slmkit_output_tokens", "output tokens generated", registry=registry)
        self.prompt_tokens = Counter("slmkit_prompt_tokens", "prompt tokens received", registry=registry)
        self.requests = Counter("slmkit_requests", "finished requests", ["finish_reason"], registry=registry)
        self.window_s = window_s
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens)

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.output_tokens.inc(n)
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - self.window_s
        return sum(n for t, n in list(self.recent) if t >= cutoff) / self.window_s

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
