"""The OpenAI API as vLLM serves it: prompt forms and batches, echo with prompt logprobs, logit_bias,
min_tokens, stop_token_ids, text content parts, /tokenize and /detokenize; through the official
`openai` client and httpx."""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_serve_server import CONTEXT, KEY, TEXT, assert_error, make_model_dir, post, wait_until_idle

import slmkit
from slmkit.generation.api import encode_prompt, generate_ids
from slmkit.serve.server import build_app, running

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("api") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    app = build_app(model_dir, api_key=KEY, max_batch_tokens=64, block_size=8)
    with running(app) as url:
        yield url, app.state.server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return slmkit.load(model_dir)


def log_softmax(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


# ---------------------------------------------------------------------------- prompts
def test_every_prompt_form_gives_choices_in_prompt_order_times_n(client, loaded):
    model, tokenizer = loaded
    texts = ["The quick brown", "hello there", "lazy dog"]
    ids = [encode_prompt(tokenizer, t) for t in texts]
    kw = dict(model="tiny", max_tokens=6, temperature=1.0, seed=3, n=2)
    alone = [[c.text for c in client.completions.create(prompt=t, **kw).choices] for t in texts]
    for batch in (texts, ids):
        out = client.completions.create(prompt=batch, **kw)
        assert [c.index for c in out.choices] == list(range(6))
        assert [c.text for c in out.choices] == [t for per_prompt in alone for t in per_prompt]
        assert out.usage.prompt_tokens == sum(map(len, ids))  # each prompt once, whatever n is
        assert out.usage.completion_tokens == 6 * 6
    single = client.completions.create(prompt=ids[1], **kw)
    assert [c.text for c in single.choices] == alone[1]
    greedy = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in greedy.choices] == [tokenizer.decode(generate_ids(model, [p], 5, stop_tokens=[tokenizer.eot_id])[0])
                                                for p in ids]


def test_a_batch_streams_every_choice_by_its_index(server):
    url, state = server
    body = {"model": "tiny", "prompt": ["hello", "lazy dog"], "max_tokens": 5, "temperature": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    whole = post(server, "/v1/completions", {**body, "stream": False, "stream_options": None}).json()
    r = post(server, "/v1/completions", body)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    texts = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert events[-1]["usage"] == whole["usage"]
    assert wait_until_idle(state)


def test_a_bad_prompt_in_a_batch_names_it_and_leaves_nothing_running(server):
    url, state = server
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": [[5, 6], [1] * CONTEXT], "max_tokens": 2})
    assert_error(r, 400, "prompt 1: the prompt is 96 tokens")
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": [[5], [9999]], "max_tokens": 2}), 400,
                 "prompt 1: prompt token ids must be in")
    too_many = state.max_active + 1
    assert_error(post(server, "/v1/completions", {"model": "tiny", "prompt": [[5]] * too_many, "max_tokens": 1}), 400,
                 f"{too_many} prompts in one request; this server takes at most {state.max_active}")
    assert wait_until_idle(state) and not state.loop.listeners and state.active == 0


# ---------------------------------------------------------------------------- echo and prompt logprobs
@pytest.mark.parametrize("prompt_len", [12, 80])  # 80 > max_batch_tokens: the prompt is scored across two passes
def test_echo_returns_the_prompt_with_the_models_logprobs(client, loaded, prompt_len):
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, TEXT)[:prompt_len]
    expected = log_softmax(model, ids)
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice, lp = out.choices[0], out.choices[0].logprobs
    generated = generate_ids(model, [ids], 3, stop_tokens=[tokenizer.eot_id])[0]
    assert choice.text == tokenizer.decode(ids) + tokenizer.decode(generated)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == prompt_len + len(generated)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, prompt_len):
        assert lp.token_logprobs[t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-4)
        top = expected[t - 1].topk(2)  # keyed by token text, as OpenAI's shape is: tokens of the same text share a key
        by_text = {lp.tokens[t]: lp.token_logprobs[t]}  # the chosen token, then the top 2
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            by_text.setdefault(tokenizer.decode_bytes([i]).decode(errors="replace"), v)
        assert list(lp.top_logprobs[t]) == list(by_text)
        assert list(lp.top_logprobs[t].values()) == pytest.approx(list(by_text.values()), abs=1e-4)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert out.usage.prompt_tokens == prompt_len and out.usage.completion_tokens == len(generated)


def test_echo_with_max_tokens_0_returns_only_the_prompt(client, loaded):
    model, tokenizer = loaded
    prompt = "The quick brown fox jumps"
    ids = encode_prompt(tokenizer, prompt)
    expected = log_softmax(model, ids)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    first, *rest = choice.logprobs.token_logprobs
    assert first is None and rest == pytest.approx([float(expected[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)
    assert choice.logprobs.top_logprobs[1:] == [{tok: lp} for tok, lp in zip(choice.logprobs.tokens[1:], rest)]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    plain = client.completions.create(model="tiny", prompt=[prompt, "hello"], max_tokens=0, echo=True)
    assert [c.text for c in plain.choices] == [prompt, "hello"] and plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="0 is for echo"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)


def test_a_streamed_echo_joins_to_the_whole_response(server):
    body = {"model": "tiny", "prompt": ["hello there", "The quick"], "max_tokens": 4, "temperature": 0, "echo": True,
            "logprobs": 1}
    whole = {c["index"]: c for c in post(server, "/v1/completions", body).json()["choices"]}
    r = post(server, "/v1/completions", {**body, "stream": True})
    joined = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                j = joined.setdefault(c["index"], {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
                j["text"] += c["text"]
                for key in ("tokens", "token_logprobs", "text_offset"):
                    j[key] += c["logprobs"][key] if c["logprobs"] else []
    for index, c in whole.items():
        assert joined[index]["text"] == c["text"]
        assert joined[index]["tokens"] == c["logprobs"]["tokens"]
        assert joined[index]["text_offset"] == c["logprobs"]["text_offset"]
        first, *rest = joined[index]["token_logprobs"]  # batched with other rows: float sums may round differently
        assert first is None and rest == pytest.approx(c["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_echo_is_scored_even_when_the_prompt_is_in_the_prefix_cache(client):
    prompt = "over the lazy dog, help? " * 3
    for _ in range(2):
        cached = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0).usage.prompt_tokens_details
    assert cached.cached_tokens > 0
    scored = [client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
              for _ in range(2)]
    assert scored[0].usage.prompt_tokens_details.cached_tokens == 0
    assert scored[0].choices[0].logprobs.token_logprobs == scored[1].choices[0].logprobs.token_logprobs


# ---------------------------------------------------------------------------- sampling fields
def test_logit_bias_steers_the_choice(client, loaded):
    _, tokenizer = loaded
    [a] = tokenizer.encode("A")
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logit_bias={str(a): 100})
    assert out.choices[0].text == "AAAA"
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=1, temperature=0, logprobs=0)
    [first] = tokenizer.encode(plain.choices[0].text, allowed_special="all")
    banned = client.completions.create(model="tiny", prompt="hello", max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(a): 100})
    assert chat.choices[0].message.content == "AAA"


def test_min_tokens_and_stop_token_ids(client, loaded):
    _, tokenizer = loaded
    [a] = tokenizer.encode("A")
    eot = tokenizer.eot_id
    kw = dict(model="tiny", prompt="hello", max_tokens=8, temperature=0)
    ends = client.completions.create(**kw, logit_bias={str(eot): 100})
    assert (ends.choices[0].text, ends.choices[0].finish_reason, ends.usage.completion_tokens) == ("", "stop", 0)
    held = client.completions.create(**kw, logit_bias={str(eot): 100}, extra_body={"min_tokens": 5})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 5
    stopped = client.completions.create(**kw, logit_bias={str(a): 100}, extra_body={"stop_token_ids": [a], "ignore_eos": True})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")  # ignore_eos leaves stop_token_ids
    later = client.completions.create(**kw, logit_bias={str(a): 100}, extra_body={"stop_token_ids": [a], "min_tokens": 2})
    assert later.usage.completion_tokens == 2 and "A" not in later.choices[0].text


@pytest.mark.parametrize("extra, fragment, param", [
    ({"logit_bias": {"5": 101}}, "logit_bias.5 must be <= 100, not 101", "logit_bias.5"),
    ({"logit_bias": {"a5": 1}}, "String should match pattern", "logit_bias.a5"),
    ({"logit_bias": {"99999": 1}}, "logit_bias token ids must be in [0, ", "logit_bias"),
    ({"min_tokens": 3, "max_tokens": 2}, "min_tokens must be between 0 and max_tokens (2), not 3", "min_tokens"),
    ({"min_tokens": -1}, "min_tokens must be >= 0", "min_tokens"),
    ({"stop_token_ids": [99999]}, "stop_token_ids token ids must be in", "stop_token_ids"),
    ({"stop_token_ids": "5"}, "stop_token_ids: Input should be a valid list", "stop_token_ids"),
    ({"echo": 1}, "echo: Input should be a valid boolean", "echo"),
])
def test_bad_sampling_fields_are_400s_naming_them(server, extra, fragment, param):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra})
    assert_error(r, 400, fragment)
    assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------- chat content parts
def test_chat_text_parts_are_joined_by_newlines(client):
    kw = dict(model="tiny", max_tokens=6, temperature=0)
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                                  {"type": "text", "text": "there"}]}], **kw)
    joined = client.chat.completions.create(messages=[{"role": "user", "content": "hello\nthere"}], **kw)
    assert parts.choices[0].message.content == joined.choices[0].message.content
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens


@pytest.mark.parametrize("part, fragment, param", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "content parts of type 'image_url' are not served",
     "messages.0.content.1.type"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "type 'input_audio'", "messages.0.content.1.type"),
    ({"type": "text"}, "messages.0.content.1.text is required", "messages.0.content.1.text"),
    ({"type": "text", "text": "x", "cache_control": {}}, "unsupported field 'messages.0.content.1.cache_control'",
     "messages.0.content.1.cache_control"),
])
def test_other_content_parts_are_400s_naming_the_field(server, part, fragment, param):
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    r = post(server, "/v1/chat/completions", body)
    assert_error(r, 400, fragment)
    assert r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------- /tokenize, /detokenize
def test_tokenize_gives_the_ids_completions_use(server, client, loaded, model_dir):
    transformers = pytest.importorskip("transformers")
    _, tokenizer = loaded
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    text = "The quick brown fox<|endoftext|> jumps"
    r = post(server, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == encode_prompt(tokenizer, text) == theirs(text)["input_ids"]
    assert r["token_strs"] == theirs.convert_ids_to_tokens(r["tokens"])
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    assert client.completions.create(model="tiny", prompt=text, max_tokens=1).usage.prompt_tokens == r["count"]
    assert post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["token_strs"] is None
    assert post(server, "/detokenize", {"model": "tiny", "tokens": r["tokens"]}).json() == {"prompt": text}


def test_tokenize_a_chat_gives_the_prompt_chat_completions_use(server, client, loaded):
    _, tokenizer = loaded
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = post(server, "/tokenize", {"messages": messages}).json()
    assert tokenizer.decode(r["tokens"]) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == r["count"]
    bare = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert r["tokens"][: bare["count"]] == bare["tokens"] and bare["count"] < r["count"]


@pytest.mark.parametrize("path, body, status, fragment, param", [
    ("/tokenize", {"prompt": 5}, 400, "prompt: Input should be a valid string", "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' does not exist", "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, 400,
     "add_special_tokens: Input should be False", "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "unsupported field 'continue_final_message'", "continue_final_message"),
    ("/tokenize", {"messages": []}, 400, "messages: List should have at least 1 item", "messages"),
    ("/tokenize", {}, 400, "prompt is required", "prompt"),
    ("/detokenize", {"tokens": [1, 99999]}, 400, "token id 99999 is outside the vocabulary", "tokens"),
    ("/detokenize", {"tokens": "1"}, 400, "tokens: Input should be a valid list", "tokens"),
])
def test_tokenize_errors(server, path, body, status, fragment, param):
    r = post(server, path, body)
    assert_error(r, status, fragment)
    assert r.json()["error"]["param"] == param


def test_tokenize_needs_the_key_when_one_is_set(server):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert_error(post(server, path, body, key=None), 401, "API key")
