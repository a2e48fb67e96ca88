"""Property-based fuzzing of the server from its own OpenAPI schema (schemathesis), on loopback.

Valid and invalid requests for every operation: no 5xx, every error in OpenAI's shape, a greedy
stream running beside the fuzzing gets the same text as alone, and every slot comes back.
SLMKIT_FUZZ_EXAMPLES sets the examples per generation mode (default 60: about a minute on one core).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, settings
from test_serve_hardening import AUTH, BYSTANDER, in_flight, stream_text
from test_serve_server import KEY, make_model_dir, wait_until_idle

from slmkit.serve.server import build_app, running

EXAMPLES = int(os.environ.get("SLMKIT_FUZZ_EXAMPLES", "60"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_schema_fuzzing_gives_no_5xx_and_leaves_bystanders_and_slots_intact(tmp_path):
    app = build_app(make_model_dir(tmp_path / "tiny"), api_key=KEY, max_batch_tokens=64, block_size=8)
    state = app.state.server
    with running(app) as url:
        alone = stream_text(url, BYSTANDER)
        assert alone[1] == "length"
        schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH)
        statuses: Counter[int] = Counter()
        failures: list[str] = []

        def fuzz(mode: schemathesis.GenerationMode) -> None:
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=schema.as_strategy(generation_mode=mode))
            def one(case) -> None:
                if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = "tiny"  # past the model lookup, into generation
                response = case.call(base_url=url, headers=AUTH, timeout=60)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {case.method} {case.path} {case.body!r:.300}: {response.text:.300}")
                elif response.status_code >= 400:
                    error = response.json().get("error", {})
                    if set(error) != {"message", "type", "param", "code"}:
                        failures.append(f"not OpenAI-shaped: {case.method} {case.path}: {response.text:.300}")

            one()

        bystanders: list[tuple[str, str | None]] = []
        done = threading.Event()

        def keep_streaming() -> None:  # long greedy streams, back to back, for as long as the fuzzing lasts
            while not done.is_set():
                bystanders.append(stream_text(url, BYSTANDER, delay=0.01))

        rss_before, start = rss_mib(), time.perf_counter()
        beside = threading.Thread(target=keep_streaming)
        beside.start()
        try:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                fuzz(mode)
        finally:
            done.set()
            beside.join()
        seconds = time.perf_counter() - start
        assert wait_until_idle(state)
        slots = in_flight(url)
        print(f"\nfuzz: {sum(statuses.values())} requests in {seconds:.0f} s, statuses {dict(sorted(statuses.items()))}, "
              f"5xx {sum(n for s, n in statuses.items() if s >= 500)}; bystanders {len(bystanders)}, "
              f"identical {sum(b == alone for b in bystanders)}; in flight after {slots:g}; "
              f"RSS {rss_before:.0f} -> {rss_mib():.0f} MiB")
    assert not failures, "\n".join(failures[:10])
    assert bystanders and all(b == alone for b in bystanders)
    assert slots == 0 and state.active == 0
    assert sum(statuses.values()) >= EXAMPLES  # the fuzzing really ran
