"""The OpenAI-compatible server, driven through the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import slmkit
from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.generation.api import encode_prompt, generate_ids
from slmkit.model import Transformer
from slmkit.model.io import save_model_dir
from slmkit.chat import ChatFormat
from slmkit.serve.server import build_app, running
from slmkit.tokenizer import train_bpe

TEXT = "User: hello there\nAssistant: hi, how can I help?\nThe quick brown fox jumps over the lazy dog.\n" * 10
CONTEXT = 96
KEY = "sk-test-key"


def make_model_dir(path: Path, special_tokens=None, chat_template: str | None = None) -> Path:
    tokenizer = train_bpe([TEXT], 300, **({"special_tokens": special_tokens} if special_tokens else {}))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      context_length=CONTEXT, init_std=0.3)
    save_model_dir(Transformer(cfg), path, tokenizer, {"temperature": 0.0})
    if chat_template is not None:
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config_path.write_text(json.dumps({**config, "chat_template": chat_template}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    app = build_app(model_dir, api_key=KEY, max_batch_tokens=64, block_size=8)
    with running(app) as url:
        yield url, app.state.server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def reference_text(model_dir, prompt, max_tokens):
    model, tokenizer = slmkit.load(model_dir)
    return slmkit.generate(model, tokenizer, prompt, max_new_tokens=max_tokens, temperature=0.0)


def wait_until_idle(server_state, timeout=10.0):
    engine = server_state.engine
    deadline = time.monotonic() + timeout
    while (engine.running or engine.waiting or not engine.inbox.empty()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return engine.blocks.num_free == engine.blocks.num_blocks and not engine.running


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_equals_greedy_generate(client, model_dir, server):
    out = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=20, temperature=0)
    assert out.choices[0].text == reference_text(model_dir, "The quick brown", 20)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == len(encode_prompt(server[1].tokenizer, "The quick brown"))
    assert out.usage.completion_tokens > 0
    assert wait_until_idle(server[1])


def test_streaming_completion_joins_to_the_same_text(client, model_dir):
    chunks = list(client.completions.create(model="tiny", prompt="hello", max_tokens=15, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference_text(model_dir, "hello", 15)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_stream_ends_with_done_and_usage(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5 or json.loads(events[-2])["choices"] == []


def test_chat_uses_chatml_and_streams_the_same_reply(client, model_dir, server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[0].choices[0].delta.role == "assistant"
    model, tokenizer = slmkit.load(model_dir)
    prompt = tokenizer.encode("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n"
                              "<|im_start|>assistant\n", allowed_special="all")
    stops = [tokenizer.eot_id, tokenizer.special_tokens["<|im_end|>"]]
    ids = generate_ids(model, [prompt], 12, stop_tokens=stops)[0]
    assert whole.choices[0].message.content == tokenizer.decode(ids)
    assert whole.usage.prompt_tokens == len(prompt)


def test_adapters_are_models_chosen_per_request(model_dir, tmp_path):
    from safetensors.torch import save_file

    model, tokenizer = slmkit.load(model_dir)
    q = model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, q.in_features, generator=g) * 0.5, torch.randn(q.out_features, 4, generator=g) * 0.5
    adapter = tmp_path / "styled"
    adapter.mkdir()
    save_file({"layers.0.self_attn.q_proj.lora_A.weight": a, "layers.0.self_attn.q_proj.lora_B.weight": b},
              str(adapter / "adapter.safetensors"))
    (adapter / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4}')
    prompt = encode_prompt(tokenizer, "The quick brown")
    base = tokenizer.decode(generate_ids(model, [prompt], 10, stop_tokens=[tokenizer.eot_id])[0])
    with torch.no_grad():
        q.weight += b @ a  # alpha / r = 1
    merged = tokenizer.decode(generate_ids(model, [prompt], 10, stop_tokens=[tokenizer.eot_id])[0])
    assert base != merged
    with running(build_app(model_dir, adapters={"styled": str(adapter)})) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny", "styled"]
        texts = {name: c.completions.create(model=name, prompt="The quick brown", max_tokens=10, temperature=0).choices[0].text
                 for name in ("tiny", "styled")}
    assert texts == {"tiny": base, "styled": merged}


def test_chat_template_from_tokenizer_config(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    directory = make_model_dir(tmp_path / "m", chat_template=template)
    _, tokenizer = slmkit.load(directory)
    chat = ChatFormat.for_model(directory, tokenizer)
    assert tokenizer.decode(chat.prompt_ids([{"role": "user", "content": "hi"}])) == "[user] hi\n[assistant]"


def test_chat_without_a_template_is_a_clear_error(tmp_path):
    directory = make_model_dir(tmp_path / "plain", special_tokens=["<|endoftext|>"])
    with running(build_app(directory)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])


def test_embeddings_are_mean_pooled_hidden_states(client, model_dir):
    model, tokenizer = slmkit.load(model_dir)
    with torch.no_grad():
        expected = [model(torch.tensor([encode_prompt(tokenizer, t)]), return_hidden=True)[0].mean(0) for t in ("hello", "lazy dog")]
    for fmt in ("base64", "float"):  # the client asks for base64 unless told otherwise
        kw = {"encoding_format": "float"} if fmt == "float" else {}
        out = client.embeddings.create(model="tiny", input=["hello", "lazy dog"], **kw)
        assert [d.index for d in out.data] == [0, 1]
        for d, e in zip(out.data, expected):
            assert torch.allclose(torch.tensor(d.embedding), e, atol=1e-5)


def test_logprobs_and_n(client):
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=1.0, n=3, seed=1, logprobs=2)
    assert len(out.choices) == 3
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)  # the chosen + top 2
        assert all(t[token] == x for token, x, t in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))


def test_metrics_report_engine_state_and_latencies(server, client):
    client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("slmkit_queue_depth", "slmkit_running_sequences", "slmkit_kv_blocks_used", "slmkit_kv_blocks_free",
                 "slmkit_prefix_cache_hit_rate", "slmkit_tokens_per_second", "slmkit_time_to_first_token_seconds_bucket",
                 "slmkit_time_per_output_token_seconds_bucket", "slmkit_output_tokens_total"):
        assert name in text
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- errors
def post(server, path, body=None, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(server[0] + path, json=body, content=content, headers=headers)


def assert_error(r, status, fragment):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]


def test_malformed_json_and_wrong_types(server):
    assert_error(post(server, "/v1/completions", content=b'{"model": "tiny", "prompt": '), 400, "not valid JSON")
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens")
    assert_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": "hi"}), 400, "messages")


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "'gpt-4' does not exist"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1, not 0"),
    ({"model": "tiny", "prompt": "x", "max_tokens": CONTEXT}, 400, "exceed the model's context"),
    ({"model": "tiny", "prompt": [5] * CONTEXT, "max_tokens": 1}, 400, f"context is {CONTEXT} tokens"),
    ({"model": "tiny", "prompt": "x", "n": 1000}, 400, "n must be between 1 and"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
])
def test_bad_requests(server, body, status, fragment):
    assert_error(post(server, "/v1/completions", body), status, fragment)


def test_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_body_over_the_limit_is_413(server):
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)}), 413, "larger than")


def test_auth(server):
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=None), 401, "API key")
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server[0] + "/health").status_code == 200  # probes need no key


def test_queue_full_is_429_with_retry_after(model_dir):
    app = build_app(model_dir, max_seqs=1, max_queue=0, block_size=8)
    state = app.state.server
    with running(app) as url:
        paused = threading.Event()
        state.loop.run(paused.wait)  # hold the engine thread, so the first request stays in flight
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        first = threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/completions", json=body)))
        results = []
        first.start()
        while state.active == 0:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json=body)
        assert_error(r, 429, "busy")
        assert r.headers["retry-after"] == "1"
        paused.set()
        first.join()
        assert results[0].status_code == 200
        assert wait_until_idle(state)


def test_client_disconnect_mid_stream_frees_blocks(server, monkeypatch):
    url, state = server
    engine = state.engine
    step = engine.step

    def slow_step():  # 80 tokens then take seconds, so the pause below always lands mid-generation
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = engine.generated
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 80, "temperature": 0, "stream": True, "ignore_eos": True}
    paused = threading.Event()
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(lines)
        state.loop.run(paused.wait)  # the engine stops mid-generation while the client goes away
        assert engine.blocks.num_used > 0
    paused.set()
    assert wait_until_idle(state)
    assert engine.generated - before < 80  # aborted, not run to the end
    assert not state.loop.listeners


# ---------------------------------------------------------------------------- load
def test_concurrent_streaming_clients_get_exact_greedy_outputs(server, model_dir):
    """8 clients x 24 requests: no errors, no lost or duplicated tokens, blocks all back."""
    url, state = server
    model, tokenizer = slmkit.load(model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tokenizer.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (24,), generator=g)]
    expected = [generate_ids(model, [p], 12)[0] for p in prompts]
    got: dict[int, list[str]] = {}
    errors = []

    def client_thread(worker):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        for i in range(worker, len(prompts), 8):
            try:
                stream = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
                got[i] = [chunk.choices[0].text for chunk in stream if chunk.choices]
            except Exception as e:  # noqa: BLE001 -- collected and reported below
                errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ["".join(got[i]) for i in range(len(prompts))] == [tokenizer.decode(e) for e in expected]
    assert wait_until_idle(state)


# ---------------------------------------------------------------------------- process
def test_sigterm_exits_cleanly(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(slmkit.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "serve", str(model_dir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_measures_every_request(server, capsys):
    from slmkit.cli import main
    from slmkit.serve.bench import bench_serve, summarize

    url, _state = server
    result = bench_serve(url, concurrency=4, requests=8, prompt_len=10, max_tokens=6, api_key=KEY, vocab_size=256)
    assert (result.completed, result.failed) == (8, 0)
    assert all(r.output_tokens == 6 for r in result.results)
    assert result.output_throughput == pytest.approx(48 / result.duration_s)
    assert 0 < result.ttft_ms["mean"] <= result.e2el_ms["mean"]
    assert result.ttft_ms["p50"] <= result.ttft_ms["p99"]
    assert summarize([0.001, 0.002, 0.003, 0.004]) == pytest.approx({"mean": 2.5, "p50": 2.5, "p95": 3.85, "p99": 3.97})
    code = main(["bench", "serve", "--url", url, "--api-key", KEY, "--concurrency", "2", "--requests", "2",
                 "--prompt-len", "4", "--max-tokens", "3", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["completed"] == 2


def test_bench_serve_reports_an_unreachable_server():
    from slmkit.cli import main

    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 2


def test_mtp_drafting_is_refused_for_a_model_without_mtp_modules(model_dir, capsys):
    from slmkit.cli import main

    with pytest.raises(InputError, match="choose one drafter"):
        build_app(model_dir, draft_mtp=True, draft_layers=1)
    assert main(["serve", str(model_dir), "--draft-mtp"]) == 2
    assert "needs a model that has them (mtp_depth >= 1)" in capsys.readouterr().err
