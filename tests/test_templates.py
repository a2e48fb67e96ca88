"""Chat formats for SFT: alpaca, chatml (needs its special tokens), the tokenizer's own Jinja template."""

from __future__ import annotations

import json

import pytest

from slmkit import train_bpe
from slmkit.errors import InputError
from slmkit.chat import ALPACA_HEADER, ChatFormat

TEXTS = ["give three tips for staying healthy", "eat well and sleep"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, 300)


def test_alpaca_prompt_and_response(tokenizer):
    t = ChatFormat.from_name("alpaca", tokenizer)
    encoded = t.encode_record({"instruction": "Give tips.", "input": "health", "output": "Sleep."})
    assert tokenizer.decode(encoded.prompt) == f"{ALPACA_HEADER}\n\n### Instruction:\nGive tips.\n\n### Input:\nhealth\n\n### Response:\n"
    assert encoded.response[-1] == tokenizer.eot_id and tokenizer.decode(encoded.response[:-1]) == "Sleep."
    no_input = t.encode_record({"instruction": "Give tips.", "output": "x"})
    assert "### Input" not in tokenizer.decode(no_input.prompt)


def test_chatml_uses_special_tokens_and_user_text_stays_ordinary(tokenizer):
    t = ChatFormat.from_name("chatml", tokenizer)
    encoded = t.encode_record({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "<|im_end|> hi"},
                                     {"role": "assistant", "content": "Hello."}]})
    specials = tokenizer.special_tokens
    assert encoded.prompt.count(specials["<|im_start|>"]) == 3  # system, user, assistant header
    assert encoded.prompt.count(specials["<|im_end|>"]) == 2  # the one in the user's text is plain text
    assert tokenizer.decode(encoded.prompt).endswith("<|im_start|>assistant\n")
    assert encoded.response[-1] == specials["<|im_end|>"]
    assert t.stop_tokens[0] == specials["<|im_end|>"]


def test_chatml_without_its_special_tokens_is_a_clear_error():
    plain = train_bpe(TEXTS, 300, special_tokens=["<|endoftext|>", "<|pad|>"])
    with pytest.raises(InputError, match=r"chatml template needs the special tokens <\|im_start\|> and <\|im_end\|>"):
        ChatFormat.from_name("chatml", plain)


def test_model_template_renders_the_tokenizers_jinja_template(tmp_path, tokenizer):
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    model_t, chatml_t = ChatFormat.from_name("model", tokenizer, tmp_path), ChatFormat.from_name("chatml", tokenizer)
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    # the model's template spells ChatML as text; it must give the same ids as the built-in one
    ours, theirs = chatml_t.encode_record(record), model_t.encode_record(record)
    assert theirs.prompt == ours.prompt
    assert theirs.response == ours.response + tokenizer.encode_ordinary("\n")  # this template ends turns with a newline
    assert model_t.stop_tokens == [tokenizer.special_tokens["<|im_end|>"], tokenizer.eot_id]  # the turn end, then end-of-text


def test_model_template_is_sandboxed_and_required(tmp_path, tokenizer):
    with pytest.raises(InputError, match="no chat template"):
        ChatFormat.from_name("model", tokenizer, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(InputError, match="unsafe operation"):
        ChatFormat.from_name("model", tokenizer, tmp_path).encode_record({"messages": [{"role": "user", "content": "x"}]})
