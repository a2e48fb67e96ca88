"""`slmkit eval generate | text-metrics | judge`: metrics against known values, and the judge
through the real openai client against a local fake OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from specialize_fixtures import tiny_model_dir, write_json

from slmkit.cli import main
from slmkit.errors import InputError
from slmkit.eval.judge import judge, parse_score
from slmkit.eval.text_metrics import normalize, read_responses, text_metrics, token_f1


def write_responses(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"instruction": "Capital of France?", "reference": "The capital is Paris.", "response": "the capital is Paris"},
    {"instruction": "2 + 2?", "reference": "four", "response": "It is five."},
]


def test_exact_match_and_token_f1():
    assert normalize("The  Capital, is PARIS!") == "capital is paris"
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    scores = text_metrics(ROWS, strict=True)
    assert scores["exact_match"] == 0.5 and scores["token_f1"] == pytest.approx(0.5)
    assert scores["rouge_l"] == pytest.approx(0.5)  # one identical pair, one with nothing in common
    assert 0 < scores["bleu"] < 100


def test_text_metrics_cli_and_bad_files(tmp_path, capsys):
    path = write_responses(tmp_path / "r.jsonl", ROWS)
    assert main(["eval", "text-metrics", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 0.5
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="holds no responses"):
        read_responses(empty)
    bad = write_responses(tmp_path / "bad.jsonl", [ROWS[0], {"instruction": "x"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: a response record needs a `response` string"):
        read_responses(bad)


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that scores by whether the response says Paris."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "judge-1" and body["temperature"] == 0.0
        prompt = body["messages"][-1]["content"]
        response = prompt.split("Assistant's response:\n", 1)[1]
        score = "Score: 90" if "Paris" in response else "10"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "judge-1",
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": score}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_through_the_openai_client(judge_url, tmp_path, capsys):
    pytest.importorskip("openai")
    result = judge(ROWS, judge_url, "judge-1")
    assert result.scores == [90, 10] and result.mean == 50
    assert result.distribution()["80-100"] == 1 and result.distribution()["0-19"] == 1
    path = write_responses(tmp_path / "r.jsonl", ROWS)
    assert main(["eval", "judge", str(path), "--judge-url", judge_url, "--judge-model", "judge-1", "-q"]) == 0
    assert capsys.readouterr().out.startswith("mean score 50.0 over 2 of 2 responses")


def test_unreachable_judge_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("openai")
    path = write_responses(tmp_path / "r.jsonl", ROWS)
    assert main(["eval", "judge", str(path), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the judge at http://127.0.0.1:9/v1 failed: APIConnectionError") and err.count("\n") == 1


def test_parse_score():
    assert parse_score("85") == 85 and parse_score("Score: 100.") == 100 and parse_score("no idea") is None


def test_eval_generate_writes_responses(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    data = write_json(tmp_path / "d.json", [{"instruction": "Give three tips.", "input": "", "output": "Eat well."}] * 3)
    out = tmp_path / "responses.jsonl"
    assert main(["eval", "generate", str(model_dir), "--data", str(data), "--out", str(out), "--template", "alpaca",
                 "--max-new-tokens", "5", "-q"]) == 0
    rows = read_responses(out)
    assert len(rows) == 3 and rows[0]["reference"] == "Eat well." and rows[0]["response"] == rows[1]["response"]
    assert main(["eval", "generate", str(model_dir), "--data", str(data), "--out", str(out), "-q"]) == 2
    assert "pass --template" in capsys.readouterr().err
