"""lm-evaluation-harness against `slmkit serve`: the per-example loglikelihoods its `local-completions`
model reads from /v1/completions (echo + logprobs, batched token prompts) equal those of its `hf`
model on the same weights exported with `slmkit convert to-hf`, and `local-chat-completions` runs a
generate_until task through /v1/chat/completions with the replies transformers generates.

The tasks are a local YAML + JSONL written here; nothing is downloaded (HF_*_OFFLINE)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# before `datasets` is imported (it reads these once): local task files only, never the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")

import slmkit
from slmkit.convert import to_hf

pytestmark = pytest.mark.real_model

CHOICE_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "three"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["cold", "warm", "loud"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit"], "answer": 0},
]
CHAT_DOCS = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is two plus two?", "answer": "4"},
    {"question": "Name a primary color.", "answer": "red"},
]


def write_task(directory: Path, name: str, docs: list[dict], **config) -> None:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    dataset = {"data_files": {"test": str(directory / f"{name}.jsonl")}, "cache_dir": str(directory / "cache")}
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": dataset, "test_split": "test",
            "doc_to_text": "{{question}}", **config}
    (directory / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    directory = tmp_path_factory.mktemp("tasks")
    write_task(directory, "slmkit_choice", CHOICE_DOCS, output_type="multiple_choice", doc_to_choice="{{choices}}",
               doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}])
    write_task(directory, "slmkit_chat", CHAT_DOCS, output_type="generate_until", doc_to_target="{{answer}}",
               generation_kwargs={"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
               metric_list=[{"metric": "exact_match"}])
    return TaskManager(include_path=str(directory))


@pytest.fixture(scope="module")
def server_process(smollm2, tmp_path_factory):
    """`slmkit serve` on the imported SmolLM2, in its own process, as a user runs it: (url, log file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(Path(slmkit.__file__).parents[1])}
    command = [sys.executable, "-m", "slmkit", "serve", str(smollm2), "--port", str(port), "--model-name", "smollm2",
               "--kv-blocks", "256", "--max-seqs", "8"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", log, proc
        assert " 400 " not in log.read_text()  # lm_eval retries failed requests: none may have failed
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def served(server_process, hf_lm, tasks) -> str:
    """The server's URL once it answers /health (it starts while the other fixtures are built)."""
    url, log, proc = server_process
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def hf_lm(smollm2, tmp_path_factory):
    """lm_eval's `hf` model on the `slmkit convert to-hf` export of the same weights."""
    from lm_eval.models.huggingface import HFLM

    export = to_hf(smollm2, tmp_path_factory.mktemp("hf") / "smollm2")
    return HFLM(pretrained=str(export), dtype="float32", batch_size=4, device="cpu")


def samples(lm, task: str, tasks, **kw) -> list[dict]:
    result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tasks, log_samples=True, **kw)
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def api_lm(name: str, **args):
    from lm_eval.api.registry import get_model

    return get_model(name).create_from_arg_string(",".join(f"{k}={v}" for k, v in args.items()))


def test_local_completions_loglikelihoods_equal_the_hf_models(served, smollm2, hf_lm, tasks):
    api = api_lm("local-completions", base_url=served + "/v1/completions", model="smollm2",
                 tokenizer_backend="huggingface", tokenizer=smollm2, batch_size=4)  # batches of 4 token prompts
    ours, theirs = samples(api, "slmkit_choice", tasks), samples(hf_lm, "slmkit_choice", tasks)
    assert len(ours) == len(theirs) == len(CHOICE_DOCS)
    for a, b in zip(ours, theirs):
        assert a["arguments"] == b["arguments"]
        assert len(a["filtered_resps"]) == len(CHOICE_DOCS[a["doc_id"]]["choices"])
        for (loglikelihood, greedy), (expected, expected_greedy) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
            assert greedy == expected_greedy
        assert a["acc"] == b["acc"]


def test_local_chat_completions_generates_what_transformers_generates(served, hf_lm, tasks):
    api = api_lm("local-chat-completions", base_url=served + "/v1/chat/completions", model="smollm2")
    ours = samples(api, "slmkit_chat", tasks, apply_chat_template=True)
    theirs = samples(hf_lm, "slmkit_chat", tasks, apply_chat_template=True)
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs]
    assert all(s["resps"][0][0].strip() for s in ours)  # greedy replies, not empty ones


def test_tokenize_on_the_imported_tokenizer_equals_transformers(served, smollm2):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(smollm2)
    text = "Café, naïve: 東京 <|im_start|>user\nhi<|im_end|>  12,345"
    r = httpx.post(served + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == theirs(text)["input_ids"]
    assert r["token_strs"] == theirs.convert_ids_to_tokens(r["tokens"])
    assert httpx.post(served + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == theirs.decode(r["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(served + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
