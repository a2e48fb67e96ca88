"""The decoding loops: greedy against a cache-free reference, seeds, batching, beams, stops, streaming."""

from __future__ import annotations

import pytest
import torch

import slmkit
from slmkit.config import ModelConfig
from slmkit.errors import InputError
from slmkit.generation import SamplingParams, generate, generate_ids, stream
from slmkit.generation.decode import beam_search
from slmkit.generation.text import TextStream
from slmkit.model import Transformer
from slmkit.model.io import save_model_dir
from slmkit.tokenizer import train_bpe

TEXTS = ["The quick brown fox jumps over the lazy dog. Ünïcödé: 日本語 and émojis 🎉🎉.\n" * 20,
         "Pack my box with five dozen liquor jugs; café naïve résumé 東京.\n" * 20]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, 300)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, context_length=64, **overrides)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


def reference_greedy(model: Transformer, prompt: list[int], steps: int, stop_tokens=()) -> list[int]:
    """Full forward over the whole sequence every step, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token in stop_tokens:
                break
            ids.append(token)
    return ids[len(prompt):]


class Scripted(Transformer):
    """A model that emits a fixed token sequence after the prompt, whatever it is fed."""

    def __init__(self, vocab_size: int, script: list[int], prompt_len: int) -> None:
        super().__init__(ModelConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=1, context_length=64))
        self.script, self.prompt_len = script, prompt_len

    def forward(self, input_ids, attention_mask=None, cache=None, return_hidden=False, logits_to_keep=0):
        b, t = input_ids.shape
        cache.advance(t)
        logits = torch.zeros(b, t, self.cfg.vocab_size)
        logits[:, -1, self.script[min(cache.length - self.prompt_len, len(self.script) - 1)]] = 10.0
        return logits


def byte_ids(tokenizer, text: str) -> list[int]:
    """`text` as one token per UTF-8 byte, so that characters and stop strings span tokens."""
    return [tokenizer.vocab.index(bytes([b])) for b in text.encode("utf-8")]


def test_greedy_matches_full_forward_argmax(model, tokenizer):
    prompt = tokenizer.encode("The quick brown")
    out = generate_ids(model, [prompt], max_new_tokens=20)[0]
    assert len(out) == 20
    assert out == reference_greedy(model, prompt, 20)
    assert out == generate_ids(model, [prompt], max_new_tokens=20)[0]  # deterministic


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_batched_left_padding_matches_one_by_one(tokenizer, pos):
    model = tiny_model(tokenizer.vocab_size, pos=pos)
    prompts = [tokenizer.encode(t) for t in ["The", "Pack my box with five dozen", "café naïve"]]
    assert len({len(p) for p in prompts}) == 3
    batched = generate_ids(model, prompts, max_new_tokens=12)
    alone = [generate_ids(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert slmkit.generate(model, tokenizer, ["The", "café naïve"], 12) == [generate(model, tokenizer, "The", 12), generate(model, tokenizer, "café naïve", 12)]


def test_batched_penalties_match_one_by_one(model, tokenizer):
    prompts = [tokenizer.encode(t) for t in ["The", "Pack my box with"]]
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    batched = generate_ids(model, prompts, max_new_tokens=15, params=params)
    assert batched == [generate_ids(model, [p], max_new_tokens=15, params=params)[0] for p in prompts]
    plain = generate_ids(model, prompts[:1], max_new_tokens=15)[0]
    assert len(set(batched[0])) >= len(set(plain))  # penalties discourage repeats


def test_seeded_sampling_is_reproducible(model, tokenizer):
    settings = {"max_new_tokens": 30, "temperature": 1.0, "top_k": 100, "stop_tokens": ()}
    a = generate(model, tokenizer, "The quick", seed=7, **settings)
    assert a == generate(model, tokenizer, "The quick", seed=7, **settings)
    assert a != generate(model, tokenizer, "The quick", seed=8, **settings)


def test_beam_search_with_one_beam_is_greedy(model, tokenizer):
    prompt = tokenizer.encode("Pack my")
    greedy = generate_ids(model, [prompt], max_new_tokens=15)[0]
    assert beam_search(model, prompt, 1, 15) == greedy
    stop = greedy[6]  # a token greedy would emit: both must end just before its first occurrence
    assert beam_search(model, prompt, 1, 15, [stop]) == generate_ids(model, [prompt], 15, stop_tokens=[stop])[0]
    assert beam_search(model, prompt, 1, 15, [stop]) == greedy[: greedy.index(stop)]


def test_beam_search_finds_a_likelier_sequence_than_greedy(model, tokenizer):
    prompt = tokenizer.encode("The")

    def logprob(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).sum().item()

    beams = beam_search(model, prompt, 4, 8)
    assert len(beams) == 8
    greedy = logprob(generate_ids(model, [prompt], 8)[0])
    assert logprob(beams) >= greedy - 1e-5 * max(1.0, abs(greedy))  # float32 rounding of a sum of size ~|greedy|
    assert generate(model, tokenizer, "The", 8, num_beams=4, stop_tokens=()) == tokenizer.decode(beams)


def test_max_new_tokens_and_the_context_limit(model, tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    for n in (0, 1, 7):
        assert len(generate_ids(model, [prompt], max_new_tokens=n)[0]) == n
    long_prompt = (prompt * 64)[:62]
    assert len(generate_ids(model, [long_prompt], max_new_tokens=10)[0]) == 3  # 62 + 3 - 1 == 64 positions fed


def test_prompt_longer_than_the_context_is_an_input_error(model, tokenizer):
    with pytest.raises(InputError, match="65 tokens.*64"):
        generate_ids(model, [[1] * 65], max_new_tokens=5)
    with pytest.raises(InputError, match="context"):
        generate(model, tokenizer, "fox " * 200)


def test_stop_tokens_and_stop_strings_spanning_tokens(tokenizer):
    script = byte_ids(tokenizer, "héllo STOP wörld") + [tokenizer.eot_id]
    model = Scripted(tokenizer.vocab_size, script, prompt_len=1)
    assert generate(model, tokenizer, "x", 40) == "héllo STOP wörld"  # the end-of-text token stops it
    assert generate(model, tokenizer, "x", 40, stop_tokens=()) .startswith("héllo STOP wörld<|endoftext|>")
    assert generate(model, tokenizer, "x", 40, stop=["STOP"]) == "héllo "
    assert generate(model, tokenizer, "x", 40, stop=["wör", "ST"]) == "héllo "  # the earliest stop wins
    assert generate(model, tokenizer, "x", 40, stop=["ö"]) == "héllo STOP w"  # a stop string inside one character's bytes
    assert generate(model, tokenizer, "x", 40, stop=["nowhere"]) == "héllo STOP wörld"
    assert generate(model, tokenizer, "x", 40, stop_tokens=[byte_ids(tokenizer, "S")[0]]) == "héllo "
    assert list(stream(model, tokenizer, "x", 40, stop=["STOP"])) == ["h", "é", "l", "l", "o", " "]


def test_streaming_emits_whole_characters_and_joins_to_generate(tokenizer):
    text = "naïve 日本語 🎉 done"
    model = Scripted(tokenizer.vocab_size, byte_ids(tokenizer, text) + [tokenizer.eot_id], prompt_len=1)
    pieces = list(stream(model, tokenizer, "x", 60))
    assert "".join(pieces) == text == generate(model, tokenizer, "x", 60)
    assert "\ufffd" not in "".join(pieces)
    assert "日" in pieces and "🎉" in pieces  # each multi-byte character arrives whole, once complete


def test_streaming_joins_to_generate_on_a_random_model(model, tokenizer):
    for seed in range(3):
        settings = {"max_new_tokens": 40, "temperature": 1.0, "seed": seed, "stop": ["e d"]}
        assert "".join(stream(model, tokenizer, "café", **settings)) == generate(model, tokenizer, "café", **settings)


def test_text_stream_flushes_an_unfinished_character_at_the_end(tokenizer):
    stream_ = TextStream(tokenizer, stop=["xyz"])
    pieces = [stream_.push(i) for i in byte_ids(tokenizer, "ab日")[:-1]] + [stream_.finish()]
    assert "".join(pieces) == "ab\ufffd"


def test_public_api_loads_and_generates(tmp_path, model, tokenizer):
    save_model_dir(model, tmp_path / "m", tokenizer)
    loaded, tok = slmkit.load(tmp_path / "m")
    assert slmkit.generate(loaded, tok, "The quick", max_new_tokens=10) == generate(model, tokenizer, "The quick", 10)
    assert slmkit.generate(loaded, tok, "", max_new_tokens=3) == generate(model, tokenizer, "<|endoftext|>", 3)
