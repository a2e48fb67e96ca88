"""Hostile requests against the server: each one is refused (or served) alone, in OpenAI's error
shape, without touching the requests of other users or leaking their slots."""

from __future__ import annotations

import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve_server import KEY, assert_error, make_model_dir, post, wait_until_idle

from slmkit.errors import InputError
from slmkit.serve import sampler
from slmkit.serve.engine import Engine, Request
from slmkit.serve.server import build_app, running

AUTH = {"Authorization": f"Bearer {KEY}"}
BYSTANDER = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
             "stream": True}


@pytest.fixture(scope="module")
def server(model_dir):
    app = build_app(model_dir, api_key=KEY, max_batch_tokens=64, block_size=8)
    with running(app) as url:
        yield url, app.state.server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("hardening") / "tiny")


def stream_text(url: str, body: dict, delay: float = 0.0) -> tuple[str, str | None]:
    """A streamed completion's text and last finish_reason; `delay` seconds between chunks read."""
    text, reason = "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            for choice in event["choices"]:
                text += choice["text"]
                reason = choice["finish_reason"] or reason
            time.sleep(delay)
    return text, reason


def in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("slmkit_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no slmkit_requests_in_flight in /metrics")


# ---------------------------------------------------------------------------- 1. one request aborts everyone's
@pytest.mark.parametrize("extreme, status", [
    ({"presence_penalty": -1e300}, 400),
    ({"frequency_penalty": 1e300}, 400),
    ({"temperature": 1e-320}, 200),  # in range: served, the sampler takes the argmax of the overflowed row
    ({"repetition_penalty": 1e-300, "temperature": 1}, 200),
])
def test_extreme_sampling_values_never_abort_a_bystander(server, extreme, status):
    url, state = server
    alone = stream_text(url, BYSTANDER)
    assert alone[1] == "length"
    result: list = []
    bystander = threading.Thread(target=lambda: result.append(stream_text(url, BYSTANDER, delay=0.005)))
    bystander.start()
    while state.active == 0:
        time.sleep(0.005)
    for _ in range(3):
        r = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 1, **extreme})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == next(iter(extreme))
    bystander.join()
    assert result == [alone]
    assert wait_until_idle(state)


def test_a_failing_sequence_ends_alone_with_an_error(model_dir, monkeypatch):
    """A sampling failure the validation did not foresee ends that sequence, not the batch."""
    from slmkit import load

    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, block_size=8)
    sample = sampler.next_token

    def failing(seq, logits):
        if seq.request.request_id == "bad":
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(seq, logits)

    monkeypatch.setattr(sampler, "next_token", failing)
    good = Request([1, 2, 3], max_tokens=20, stop_tokens=[], request_id="good")
    engine.submit(good)
    engine.submit(Request([4, 5], max_tokens=20, stop_tokens=[], request_id="bad"))
    reasons, tokens = {}, []
    while engine.has_work():
        for out in engine.step():
            if out.request_id == "good":
                tokens += out.token_ids
            reasons[out.request_id] = out.finish_reason or reasons.get(out.request_id)
    assert reasons == {"good": "length", "bad": "error"}
    alone = Engine(model, tokenizer, block_size=8).generate([Request([1, 2, 3], max_tokens=20, stop_tokens=[])])
    assert tokens == alone[0][0]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failing_forward_pass_ends_only_the_sequence_that_fails_alone(model_dir, monkeypatch):
    """A forward pass that raises is rerun sequence by sequence: the bystanders finish exactly as
    alone, only the sequence that still fails ends with "error", and every block comes back."""
    from slmkit import load

    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, block_size=8)
    run = engine.runner.run
    calls = []

    def failing(batch):
        calls.append(len(batch))
        if any(item.seq.request.request_id == "bad" for item in batch):
            raise RuntimeError("kernel failure")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", failing)
    for rid, prompt in (("good", [1, 2, 3]), ("bad", [4, 5]), ("other", [6, 7, 8, 9])):
        engine.submit(Request(prompt, max_tokens=20, stop_tokens=[], request_id=rid))
    reasons, tokens = {}, {"good": [], "other": []}
    while engine.has_work():
        for out in engine.step():
            if out.request_id in tokens:
                tokens[out.request_id] += out.token_ids
            reasons[out.request_id] = out.finish_reason or reasons.get(out.request_id)
    assert reasons == {"good": "length", "bad": "error", "other": "length"}
    assert 3 in calls and 1 in calls  # the whole batch failed, then each sequence ran alone
    alone = Engine(model, tokenizer, block_size=8)
    for rid, prompt in (("good", [1, 2, 3]), ("other", [6, 7, 8, 9])):
        assert tokens[rid] == alone.generate([Request(prompt, max_tokens=20, stop_tokens=[])])[0][0]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failed_generation_is_a_500_and_other_requests_still_work(server, monkeypatch):
    url, state = server
    sample = sampler.next_token

    def failing(seq, logits):
        if seq.request.params.temperature == 1.5:
            raise RuntimeError("sampler bug")
        return sample(seq, logits)

    monkeypatch.setattr(sampler, "next_token", failing)
    bad = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 1.5}
    assert_error(post(server, "/v1/completions", bad), 500, "generation failed")
    assert_error(post(server, "/v1/completions", {**bad, "stream": True}), 500, "generation failed")
    assert stream_text(url, BYSTANDER)[1] == "length"
    assert wait_until_idle(state) and state.active == 0


# ---------------------------------------------------------------------------- 2. permanent lockout
@pytest.mark.parametrize("stream", [False, True])
def test_a_seed_beyond_64_bits_is_a_400(server, stream):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "seed": 18446744073709551616, "stream": stream}
    r = post(server, "/v1/completions", body)
    assert_error(r, 400, "seed must be < 18446744073709551616")
    assert r.json()["error"]["param"] == "seed"
    assert_error(post(server, "/v1/completions", {**body, "seed": -1}), 400, "seed must be >= 0")
    assert_error(post(server, "/v1/completions", {**body, "seed": 2**64 - 1, "n": 2}), 400, "seed must be in [0, 2^64 - n]")
    assert post(server, "/v1/completions", {**body, "seed": 2**64 - 1}).status_code == 200


def test_engine_validation_refuses_a_seed_torch_cannot_take(model_dir):
    from slmkit import load

    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, block_size=8)
    for seed in (2**64, -1):
        with pytest.raises(InputError, match=r"seed must be in \[0, 2\^64 - n\]"):
            engine.submit(Request([1, 2], seed=seed))
    assert not engine.has_work()


def test_streams_abandoned_before_their_first_token_free_their_slots(model_dir):
    """The engine is held, so no first token ever comes; the clients give up; every slot returns."""
    app = build_app(model_dir, max_seqs=4, max_queue=4, block_size=8)
    state = app.state.server
    with running(app) as url:
        held = threading.Event()
        state.loop.run(held.wait)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}

        def abandon():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))

        clients = [threading.Thread(target=abandon) for _ in range(8)]  # every slot: 4 running + 4 queued
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        deadline = time.monotonic() + 10
        while in_flight(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(url) == 0 and state.active == 0  # freed while the engine is still held
        held.set()
        assert wait_until_idle(state)
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False})
        assert r.status_code == 200, r.text


def test_an_exception_in_admission_is_a_500_and_holds_no_slot(server, monkeypatch):
    url, state = server

    def broken(request):
        raise RuntimeError("admission bug")

    monkeypatch.setattr(state.engine, "submit", broken)
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": stream}
        assert_error(post(server, "/v1/completions", body), 500, "internal server error")
    assert state.active == 0 and not state.loop.listeners and in_flight(url) == 0


def test_health_reports_a_stuck_engine(model_dir):
    from slmkit import load
    from slmkit.serve.app import create_app

    model, tokenizer = load(model_dir)
    app = create_app(Engine(model, tokenizer, block_size=8), tokenizer, "tiny", stall_timeout=0.5)
    state = app.state.server
    with running(app) as url:
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        held = threading.Event()
        state.loop.run(held.wait)
        time.sleep(1.0)
        r = httpx.get(url + "/health")
        assert_error(r, 503, "the engine thread has been stuck for")
        held.set()
        time.sleep(0.2)
        assert httpx.get(url + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- 4. silently ignored fields, coercion
@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"tool_choice": "auto", "parallel_tool_calls": True}),
    ("/v1/completions", {"suffix": "x"}),
    ("/v1/completions", {"best_of": 2}),
    ("/v1/embeddings", {"dimensions": 8}),
    ("/tokenize", {"chat_template": "{{ messages }}"}),
])
def test_unsupported_fields_are_400s_that_name_them(server, path, extra):
    bodies = {"/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
              "/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 2},
              "/v1/embeddings": {"model": "tiny", "input": "hi"},
              "/tokenize": {"messages": [{"role": "user", "content": "hi"}]}}
    r = post(server, path, {**bodies[path], **extra})
    names = ", ".join(repr(k) for k in extra)
    assert_error(r, 400, f"{names}: this server does not implement")
    assert r.json()["error"]["param"] == next(iter(extra))


@pytest.mark.parametrize("field, value, fragment", [
    ("max_tokens", True, "max_tokens: Input should be a valid integer"),
    ("stream", "yes", "stream: Input should be a valid boolean"),
    ("temperature", "1", "temperature: Input should be a valid number"),
    ("n", 2.0, "n: Input should be a valid integer"),
    ("prompt", [1, True], "prompt.1: Input should be a valid integer"),
    ("top_p", 0, "top_p must be > 0, not 0"),
    ("logprobs", 21, "logprobs must be <= 20, not 21"),
    ("stream_options", {"include_usage": True, "x": 1}, "'stream_options.x': this server does not implement it"),
])
def test_strict_types_and_ranges(server, field, value, fragment):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, field: value})
    assert_error(r, 400, fragment)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(server, literal):
    content = ('{"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": %s}' % literal).encode()
    assert_error(post(server, "/v1/completions", content=content), 400, "temperature must be a finite number")


# ---------------------------------------------------------------------------- 5. one error shape, body limits, docs
@pytest.mark.parametrize("content, fragment", [
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', "could not be parsed as JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "could not be parsed as JSON"),
    (b'{"model": "tiny", "prompt": ', "not valid JSON"),
    (b'"just a string"', "body: Input should be a valid dictionary"),
])
def test_unparseable_bodies_are_openai_shaped_400s(server, content, fragment):
    assert_error(post(server, "/v1/completions", content=content), 400, fragment)


def test_routing_errors_are_openai_shaped(server):
    url, _ = server
    assert_error(httpx.get(url + "/v2/nothing", headers=AUTH), 404, "no route /v2/nothing")
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405, "/v1/completions does not accept GET")
    assert_error(httpx.delete(url + "/health"), 405, "/health does not accept DELETE")


def test_an_unexpected_exception_is_an_openai_shaped_500(model_dir, monkeypatch):
    app = build_app(model_dir, block_size=8)
    monkeypatch.setattr(app.state.server, "models", lambda: 1 / 0)
    with running(app) as url:
        assert_error(httpx.get(url + "/v1/models"), 500, "internal server error")


def test_a_chunked_body_over_the_limit_is_413(server):
    url, _ = server
    chunk = b'{"model": "tiny", "prompt": "' + b"x" * (2_700_000) + b'"}'

    def chunks():  # no Content-Length: the size shows only while reading
        for i in range(0, len(chunk), 65536):
            yield chunk[i : i + 65536]

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "larger than")
    small = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
    r = httpx.post(url + "/v1/completions", content=iter([small[:10], small[10:]]),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_docs_need_the_key_when_one_is_set(server, path):
    url, _ = server
    assert_error(httpx.get(url + path), 401, "API key")
    assert httpx.get(url + path, headers=AUTH).status_code == 200



@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 63599675}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 32679544}),
])
def test_a_huge_n_is_refused_at_once(server, path, body):
    """Found by the schema fuzzing: the response used to be laid out for n choices before n was checked."""
    start = time.perf_counter()
    assert_error(post(server, path, body), 400, "n must be between 1 and 64")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
], ids=["bad-content-length", "bad-request-line"])
def test_requests_too_malformed_for_the_app_get_an_openai_shaped_400(server, request_bytes):
    """uvicorn refuses these in its HTTP protocol, before any ASGI code runs."""
    import socket

    host, port = server[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("malformed HTTP request")


def test_a_chat_role_outside_the_templates_roles_is_a_400(server):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "root", "content": "hi"}]}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
