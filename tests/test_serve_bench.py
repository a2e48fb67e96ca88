"""`slmkit bench serve` against servers other than slmkit's: a scripted one that behaves like
llama-cpp-python's (text prompts only, no usage chunk, errors in OpenAI's shape), slmkit's own, and,
when installed, the real `llama_cpp.server`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
fastapi = pytest.importorskip("fastapi")

from test_serve_server import KEY, make_model_dir

from slmkit.errors import InputError
from slmkit.serve.bench import WORDS, bench_serve, error_message
from slmkit.serve.server import build_app, running


def scripted_app():
    """Streams one word per chunk, `max_tokens` of them, without a usage chunk; a token-id prompt is
    a 500 whose message echoes the input (as llama-cpp-python's validation errors do); a prompt
    saying "overload" is a 503, and "broken" breaks off the stream with an error chunk."""
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()
    seen: list[dict] = []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "me"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await request.json()
        seen.append(body)
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            return JSONResponse({"error": {"message": f"1 validation error:\n  'prompt' must be a string, got {prompt}",
                                           "type": "internal_server_error", "param": None, "code": None}}, 500)
        if "overload" in prompt:
            return JSONResponse({"detail": "the server is overloaded"}, 503)

        def chunks():
            for i in range(body["max_tokens"]):
                if "broken" in prompt and i == 2:
                    yield f"data: {json.dumps({'error': {'message': 'the model crashed', 'code': 500}})}\n\n"
                    return
                choice = {"text": f" w{i}", "index": 0, "logprobs": None, "finish_reason": None}
                yield f"data: {json.dumps({'id': 'c', 'object': 'text_completion', 'choices': [choice]})}\n\n"
            choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
            yield f"data: {json.dumps({'id': 'c', 'object': 'text_completion', 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app, seen


@pytest.fixture(scope="module")
def scripted():
    app, seen = scripted_app()
    with running(app) as url:
        yield url, seen


def test_text_prompts_and_streamed_chunks_for_a_server_that_is_not_slmkit(scripted):
    url, seen = scripted
    seen.clear()
    result = bench_serve(url, concurrency=3, requests=6, prompt_len=12, max_tokens=5)
    assert (result.completed, result.failed, result.failures) == (6, 0, [])
    assert result.prompt_kind == "text" and result.output_tokens_counted_by == {"chunks": 6}
    assert all(r.output_tokens == 5 and r.text == " w0 w1 w2 w3 w4" for r in result.results)
    assert result.output_throughput == pytest.approx(30 / result.duration_s)
    assert result.total_token_throughput == pytest.approx((30 + 6 * 12) / result.duration_s)  # one word ~ one token
    assert all(len(r.itl) == 4 and 0 < r.ttft <= r.e2el for r in result.results)
    assert result.tpot_ms["mean"] > 0
    prompts = [body["prompt"] for body in seen]
    assert len(prompts) == 6 and all(isinstance(p, str) and len(p.split()) == 12 for p in prompts)
    assert {w for p in prompts for w in p.split()} <= set(WORDS)
    assert {body["model"] for body in seen} == {"scripted"}


def test_failures_are_grouped_with_their_reasons(scripted):
    url, _ = scripted
    result = bench_serve(url, concurrency=2, requests=4, prompt_len=6, max_tokens=4, prompt_kind="ids")
    assert (result.completed, result.failed) == (0, 4)
    [group] = result.failures  # the messages echo each prompt; their first line groups them
    assert group["status"] == 500 and group["count"] == 4
    assert group["error"].startswith("1 validation error: 'prompt' must be a string, got [")
    prompts = ["the old house", [1, 2, 3], "overload", "the broken river", "overload", [4, 5]]
    result = bench_serve(url, concurrency=2, prompts=prompts, max_tokens=4, model="scripted")
    assert (result.completed, result.failed) == (1, 5)
    assert [(g["status"], g["count"]) for g in result.failures] == [(500, 2), (503, 2), (200, 1)]
    assert result.failures[1]["error"] == "the server is overloaded"
    assert result.failures[2]["error"] == "in the stream: the model crashed"
    table = result.table()
    assert "failed x2: HTTP 503: the server is overloaded" in table and "1 / 5" in table


def test_the_cli_prints_failures_in_its_json(scripted, capsys):
    from slmkit.cli import main

    url, _ = scripted
    assert main(["bench", "serve", "--url", url + "/v1", "--requests", "3", "--concurrency", "3", "--prompt-len", "4",
                 "--max-tokens", "2", "--prompt-kind", "ids", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["completed"], out["failed"], out["prompt_kind"]) == (0, 3, "ids")
    assert out["failures"][0]["status"] == 500 and out["failures"][0]["count"] == 3


@pytest.mark.parametrize("body, message", [
    (b'{"error": {"message": "bad\\n  thing", "type": "x"}}', "bad\n  thing"),
    (b'{"error": "plain"}', "plain"),
    (b'{"detail": [{"loc": ["body"]}]}', '[{"loc": ["body"]}]'),
    (b"Internal Server Error", "Internal Server Error"),
    (b"", "(empty response)"),
])
def test_error_messages_of_the_usual_shapes(body, message):
    assert error_message(body) == message


def test_an_unlistable_server_needs_a_model_name(scripted):
    with pytest.raises(InputError, match=r"cannot list the models at http://127.0.0.1:9/v1/models \(ConnectError"):
        bench_serve("http://127.0.0.1:9", requests=1)
    with pytest.raises(InputError, match="the prompt kind must be one of auto, ids, text"):
        bench_serve(scripted[0], requests=1, prompt_kind="words")


# ---------------------------------------------------------------------------- slmkit's own server
@pytest.fixture(scope="module")
def slmkit_server(tmp_path_factory):
    app = build_app(make_model_dir(tmp_path_factory.mktemp("bench") / "tiny"), api_key=KEY, max_batch_tokens=64,
                    block_size=8)
    with running(app) as url:
        yield url


def test_slmkit_gets_token_ids_and_its_usage_counts(slmkit_server):
    result = bench_serve(slmkit_server, concurrency=3, requests=6, prompt_len=10, max_tokens=6, api_key=KEY)
    assert (result.completed, result.failed, result.prompt_kind) == (6, 0, "ids")
    assert result.output_tokens_counted_by == {"usage": 6}
    assert all(r.output_tokens == 6 and r.prompt_tokens == 10 for r in result.results)
    text = bench_serve(slmkit_server, concurrency=3, requests=3, prompt_len=10, max_tokens=6, api_key=KEY,
                       prompt_kind="text")
    assert (text.completed, text.prompt_kind) == (3, "text")
    assert all(r.output_tokens == 6 and r.prompt_tokens > 0 for r in text.results)  # the server's own counts
    wrong_key = bench_serve(slmkit_server, requests=2, max_tokens=2, model="tiny", api_key="nope")
    assert wrong_key.failures[0]["status"] == 401 and wrong_key.failures[0]["count"] == 2


# ---------------------------------------------------------------------------- the real llama-cpp-python server
@pytest.mark.real_model
def test_llama_cpp_server(tmp_path):
    """llama-cpp-python's server on the SmolLM2 GGUF: it takes only text prompts and streams one
    token per chunk without a usage chunk; every request completes with exactly max_tokens tokens."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extra is not installed")
    from gguf_files import smollm2_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one request at a time inside llama_cpp; by default a new request interrupts the streaming one
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()), "--port", str(port),
                             "--n_ctx", "512", "--n_threads", "2", "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        result = bench_serve(url, concurrency=2, requests=4, prompt_len=16, max_tokens=8)
        assert (result.completed, result.failed, result.prompt_kind) == (4, 0, "text")
        assert result.output_tokens_counted_by == {"chunks": 4}
        assert all(r.output_tokens == 8 for r in result.results)
        ids = bench_serve(url, requests=2, prompt_len=4, max_tokens=2, prompt_kind="ids")
        assert ids.failed == 2 and ids.failures[0]["status"] == 500 and ids.failures[0]["count"] == 2
    finally:
        proc.terminate()
        proc.wait(30)
