"""`slmkit generate`, `slmkit chat` and `slmkit eval perplexity`, driven through `main`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.generation.chat import ChatSession, repl
from slmkit.model import Transformer
from slmkit.model.io import save_model_dir
from slmkit.tokenizer import train_bpe

TEXT = "User: hello there\nAssistant: hi, how can I help?\nThe quick brown fox jumps over the lazy dog.\n" * 10


def make_model_dir(path: Path, special_tokens=None) -> Path:
    tokenizer = train_bpe([TEXT], 300, **({"special_tokens": special_tokens} if special_tokens else {}))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, context_length=64)
    return save_model_dir(Transformer(cfg), path, tokenizer, {"temperature": 0.0})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_greedy_continuation(model_dir, capsys):
    model, tokenizer = slmkit.load(model_dir)
    expected = slmkit.generate(model, tokenizer, "The quick", max_new_tokens=12)
    code, out, _ = run(capsys, "generate", model_dir, "The quick", "--max-new-tokens", 12)
    assert code == 0 and out == expected + "\n"
    code, streamed, _ = run(capsys, "generate", model_dir, "The quick", "--max-new-tokens", 12, "--stream")
    assert code == 0 and streamed == out
    code, beams, _ = run(capsys, "generate", model_dir, "The quick", "--max-new-tokens", 12, "--num-beams", 3)
    assert code == 0 and beams == slmkit.generate(model, tokenizer, "The quick", 12, num_beams=3) + "\n"
    code, _, err = run(capsys, "generate", model_dir, "The quick", "--num-beams", 3, "--stream")
    assert code == 2 and "beam" in err


def test_generate_chat_answers_one_user_message_as_chat_does(model_dir, capsys, monkeypatch):
    code, out, _ = run(capsys, "generate", model_dir, "hello there", "--chat", "--max-new-tokens", 6)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    assert code == 0 and (out, "") == run(capsys, "chat", model_dir, "--max-new-tokens", 6)[1:]
    model, tokenizer = slmkit.load(model_dir)
    assert out == "".join(ChatSession(model, tokenizer, max_new_tokens=6).send("hello there")) + "\n"
    code, _, err = run(capsys, "generate", model_dir, "hi", "--chat", "--stop", "x")
    assert code == 2 and "--chat" in err


def test_generate_sampling_options_and_seed(model_dir, capsys):
    argv = ["generate", model_dir, "The", "--max-new-tokens", 20, "--temperature", 1.0, "--top-k", 50, "--top-p", 0.9,
            "--min-p", 0.01, "--repetition-penalty", 1.2, "--frequency-penalty", 0.1, "--presence-penalty", 0.1, "--seed", 3]
    first, second = run(capsys, *argv), run(capsys, *argv)
    assert first[0] == 0 and first == second


def test_generate_stop_string(model_dir, capsys):
    _, full, _ = run(capsys, "generate", model_dir, "The quick", "--max-new-tokens", 20)
    stop = full[3:5]
    _, out, _ = run(capsys, "generate", model_dir, "The quick", "--max-new-tokens", 20, "--stop", stop, "--stop", "zzz")
    assert out == full[: full.index(stop)] + "\n"


def test_generate_prompt_too_long_is_one_line_and_exit_2(model_dir, capsys):
    code, out, err = run(capsys, "generate", model_dir, "fox " * 100)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "tokens" in err and "64" in err


def test_eval_perplexity_text_and_json(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    code, out, _ = run(capsys, "eval", "perplexity", model_dir, doc, "--context", 32, "--stride", 16, "--json")
    result = json.loads(out)
    assert code == 0 and result["tokens"] > 0 and result["bytes"] == len(TEXT.encode())
    model, tokenizer = slmkit.load(model_dir)
    expected = slmkit.eval.perplexity(model, tokenizer, [doc], context=32, stride=16)
    assert result["perplexity"] == pytest.approx(expected.perplexity)
    code, out, _ = run(capsys, "eval", "perplexity", model_dir, doc, "--batch-size", 2)
    assert code == 0 and "perplexity" in out and "bits per byte" in out and "mean NLL" in out
    code, _, err = run(capsys, "eval", "perplexity", model_dir, doc, "--stride", 999)
    assert code == 2 and "stride" in err


def test_chat_repl_on_stdin_with_reset_and_exit(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\n/reset\nhi\n/exit\nnever read\n"))
    code, out, _ = run(capsys, "chat", model_dir, "--max-new-tokens", 6)
    model, tokenizer = slmkit.load(model_dir)
    first = "".join(ChatSession(model, tokenizer, max_new_tokens=6).send("hello there"))
    after_reset = "".join(ChatSession(model, tokenizer, max_new_tokens=6).send("hi"))  # no memory of "hello there"
    assert code == 0 and out == f"{first}\n(history cleared)\n{after_reset}\n"


def test_chat_ends_cleanly_at_end_of_input(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello"))
    code, out, _ = run(capsys, "chat", model_dir, "--max-new-tokens", 4)
    model, tokenizer = slmkit.load(model_dir)
    assert code == 0 and out == "".join(ChatSession(model, tokenizer, max_new_tokens=4).send("hello")) + "\n"


@pytest.mark.parametrize("chatml", [True, False])
def test_chat_history_is_trimmed_to_the_context(tmp_path, chatml):
    specials = None if chatml else ["<|endoftext|>"]
    model, tokenizer = slmkit.load(make_model_dir(tmp_path / "m", specials))
    session = ChatSession(model, tokenizer, max_new_tokens=8)
    assert session.format.name == ("chatml" if chatml else "plain")
    for i in range(12):
        reply = "".join(session.send(f"message number {i} about the quick brown fox"))
        assert session.history[-1] == ("assistant", reply.strip())
        assert len(session.prompt_ids()) + session.reply_tokens <= model.cfg.context_length
    assert session.history[-2] == ("user", "message number 11 about the quick brown fox")
    assert session.history[0][0] == "user" and len(session.history) < 24  # the oldest exchanges were dropped
    with pytest.raises(InputError, match="at most"):
        list(session.send("fox " * 80))
    assert session.history[-2][1].startswith("message number 11")  # a rejected message leaves no trace
    out = io.StringIO()
    repl(session, io.StringIO("fox " * 80 + "\n"), out)
    assert out.getvalue().startswith("error: the message is")


def test_chat_format_prompts(tmp_path):
    model, tokenizer = slmkit.load(make_model_dir(tmp_path / "m"))
    session = ChatSession(model, tokenizer, max_new_tokens=4)
    session.history = [("user", "hi <|im_end|>")]  # user text never becomes a special token
    assert tokenizer.decode(session.prompt_ids()) == "<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.special_tokens["<|im_end|>"] in session.format.stop_tokens
    plain_model, plain_tok = slmkit.load(make_model_dir(tmp_path / "p", ["<|endoftext|>"]))
    plain = ChatSession(plain_model, plain_tok, max_new_tokens=4)
    plain.history = [("user", "hi"), ("assistant", "hello"), ("user", "bye")]
    assert plain_tok.decode(plain.prompt_ids()) == "User: hi\nAssistant: hello\nUser: bye\nAssistant:"


def test_chat_uses_the_models_own_chat_template(tmp_path):
    directory = make_model_dir(tmp_path / "m", ["<|endoftext|>"])
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    config_path.write_text(json.dumps(config))
    model, tokenizer = slmkit.load(directory)
    session = ChatSession(model, tokenizer, max_new_tokens=4)
    reply = "".join(session.send("hello"))
    session.history.append(("user", "again"))
    expected = f"[user] hello\n[assistant] {reply.strip()}\n[user] again\n[assistant] "
    assert session.prompt_ids() == tokenizer.encode(expected, allowed_special="all")
