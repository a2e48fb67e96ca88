"""The Transformer: reference attention == SDPA for every variant, KV cache and padding
consistency, components, presets, config errors and model directories."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close

from slmkit.config import PRESETS, ModelConfig, parse_overrides
from slmkit.errors import InputError
from slmkit.model import Transformer
from slmkit.model.io import load_model, save_model_dir

TOL = 1e-5

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads with n_heads=4
POS = {
    "learned": dict(pos="learned"),
    "sinusoidal": dict(pos="sinusoidal"),
    "rope": dict(pos="rope"),
    "rope-linear": dict(pos="rope", rope_scaling={"type": "linear", "factor": 4.0}),
    "rope-llama3": dict(pos="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "alibi": dict(pos="alibi"),
    "none": dict(pos="none"),
}


def small_config(**overrides) -> ModelConfig:
    """A two-layer model with weights large enough (init_std 0.3) that attention is far from uniform."""
    base = dict(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, init_std=0.3)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def twin(model: Transformer, attention: str) -> Transformer:
    """The same weights with the other attention implementation."""
    other = Transformer(ModelConfig.from_dict({**model.cfg.to_dict(), "attention": attention})).eval()
    other.load_state_dict(model.state_dict())
    return other


def ids(b: int, t: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.stack([torch.cat([torch.zeros(t - n), torch.ones(n)]) for n in lengths]).long()


def decode_stepwise(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor | None = None, prefill: int = 1) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed one token at a time through the KV cache."""
    cache = model.new_cache(tokens.shape[0])
    out = [model(tokens[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], cache=cache)]
    for i in range(prefill, tokens.shape[1]):
        out.append(model(tokens[:, i : i + 1], attention_mask=None if mask is None else mask[:, : i + 1], cache=cache))
    return torch.cat(out, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------- reference == SDPA
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qknorm"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("pos", list(POS))
@pytest.mark.parametrize("heads", list(HEADS))
def test_reference_attention_equals_sdpa(heads: str, pos: str, causal: bool, qk_norm: bool) -> None:
    cfg = small_config(n_kv_heads=HEADS[heads], causal=causal, qk_norm=qk_norm, **POS[pos])
    fast = build(cfg)
    ref = twin(fast, "reference")
    x = ids(3, 12)
    mask = left_pad_mask([12, 7, 3], 12)
    with torch.no_grad():
        assert_close(ref(x), fast(x), TOL)
        assert_close(ref(x, attention_mask=mask), fast(x, attention_mask=mask), TOL)
        assert_close(decode_stepwise(ref, x, prefill=5), decode_stepwise(fast, x, prefill=5), TOL)
        assert_close(decode_stepwise(ref, x, mask, prefill=5), decode_stepwise(fast, x, mask, prefill=5), TOL)


# ---------------------------------------------------------------------------- KV cache and padding
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("pos", list(POS))
def test_kv_cache_token_by_token_equals_full_sequence(pos: str, attention: str) -> None:
    model = build(small_config(n_kv_heads=2, attention=attention, **POS[pos]))
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x)
        assert_close(decode_stepwise(model, x, prefill=1), full, TOL)
        assert_close(decode_stepwise(model, x, prefill=9), full, TOL)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("pos", list(POS))
def test_left_padded_batch_equals_unpadded_rows(pos: str, attention: str) -> None:
    model = build(small_config(n_kv_heads=2, attention=attention, **POS[pos]))
    t, lengths = 10, [10, 6, 2]
    x = ids(3, t)
    mask = left_pad_mask(lengths, t)
    with torch.no_grad():
        batch = model(x, attention_mask=mask)
        cached = decode_stepwise(model, x, mask, prefill=4)
        for row, n in enumerate(lengths):
            alone = model(x[row : row + 1, t - n :])[0]
            assert_close(batch[row, t - n :], alone, TOL)
            assert_close(cached[row, t - n :], alone, TOL)


def test_attention_mask_of_wrong_shape_is_an_input_error() -> None:
    model = build(small_config())
    with pytest.raises(InputError, match="attention_mask must have shape"):
        model(ids(2, 5), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_context_overflow_is_an_input_error() -> None:
    model = build(small_config(context_length=8))
    with pytest.raises(InputError, match="longer than the model's context length 8"):
        model(ids(1, 9))
    cache = model.new_cache(1)
    model(ids(1, 8), cache=cache)
    with pytest.raises(InputError, match="sequence of 9 tokens"):
        model(ids(1, 1), cache=cache)


# ---------------------------------------------------------------------------- components
def test_rmsnorm_normalizes_and_plus_one_starts_at_identity() -> None:
    x = torch.randn(3, 32) * 5
    for plus_one in (False, True):
        model = build(small_config(norm="rmsnorm", norm_plus_one=plus_one))
        y = model.norm(x)
        assert torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-4)
    assert torch.equal(model.norm.weight, torch.zeros(32))  # plus_one stores w - 1


@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 256), (1, 1, 6)])
def test_inference_rmsnorm_equals_the_composite_one(shape) -> None:
    x, w = torch.randn(shape) * 3, torch.randn(shape[-1])
    expected = torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-6)
    from slmkit.model.layers import rms_norm_by_layer_norm

    assert_close(rms_norm_by_layer_norm(x, w, 1e-6), expected, TOL)
    norm = build(small_config(d_model=shape[-1], n_heads=1)).norm
    with torch.no_grad():
        norm.weight.copy_(w)
        inference = norm(x)
    assert_close(inference, norm(x), TOL)  # no-grad path vs training path


def test_layernorm_matches_torch_and_honours_norm_bias() -> None:
    with_bias = build(small_config(norm="layernorm"))
    assert isinstance(with_bias.norm, torch.nn.LayerNorm) and with_bias.norm.bias is not None
    assert build(small_config(norm="layernorm", norm_bias=False)).norm.bias is None


@pytest.mark.parametrize("norm,plus_one", [("layernorm", False), ("rmsnorm", False), ("rmsnorm", True)])
@pytest.mark.parametrize("mlp", ["gelu", "gelu_tanh", "swiglu", "geglu"])
def test_every_norm_and_mlp_trains_one_step(norm: str, mlp: str, plus_one: bool) -> None:
    model = build(small_config(norm=norm, norm_plus_one=plus_one, mlp=mlp)).train()
    x = ids(2, 8)
    logits = model(x)
    assert logits.shape == (2, 8, 97) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    gated = mlp in ("swiglu", "geglu")
    assert hasattr(model.layers[0].mlp, "gate_proj") == gated
    assert model.cfg.ffn_hidden == (128 if gated else 4 * 32)  # 8/3 * 32 rounded up to 64


def test_gelu_variants_differ() -> None:
    a = build(small_config(mlp="gelu"))
    b = twin(a, "sdpa")
    b.layers[0].mlp.act = torch.nn.GELU(approximate="tanh")
    x = ids(1, 8)
    assert 0 < max_diff(a(x), b(x))


def test_logit_softcap_bounds_logits() -> None:
    plain = build(small_config(init_std=1.0))
    capped = Transformer(small_config(init_std=1.0, logit_softcap=2.0)).eval()
    capped.load_state_dict(plain.state_dict())
    x = ids(1, 8)
    raw, soft = plain(x), capped(x)
    assert raw.abs().max() > 2.0 and soft.abs().max() <= 2.0
    assert_close(soft, 2.0 * torch.tanh(raw / 2.0), TOL)


def test_embed_scale_multiplies_embeddings_by_sqrt_d() -> None:
    plain = build(small_config(tie_embeddings=False))
    scaled = Transformer(small_config(tie_embeddings=False, embed_scale=True)).eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.embed_tokens.weight.mul_(32**0.5)
    x = ids(1, 6)
    assert_close(plain(x), scaled(x), TOL)


def test_tied_and_untied_embeddings() -> None:
    tied = build(small_config(tie_embeddings=True))
    untied = build(small_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32
    assert "lm_head.weight" in dict(untied.named_parameters())


def test_biases_are_created_when_asked() -> None:
    model = build(small_config(attn_bias=True, mlp_bias=True, lm_head_bias=True, mlp="gelu"))
    names = dict(model.named_parameters())
    for name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
                 "mlp.up_proj.bias", "mlp.down_proj.bias"):
        assert f"layers.0.{name}" in names
    assert "lm_head.bias" in names
    assert not any(n.endswith("bias") and "layers" in n for n, _ in build(small_config()).named_parameters())


def test_model_is_deterministic_under_seed() -> None:
    x = ids(1, 8)
    assert torch.equal(build(small_config(), seed=3)(x), build(small_config(), seed=3)(x))


# ---------------------------------------------------------------------------- presets and config
def test_gpt2_small_has_124_439_808_parameters() -> None:
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("gpt2-small"))
    assert model.num_parameters() == 124_439_808
    assert model.num_parameters(embedding=False) == 124_439_808 - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name: str) -> None:
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.lm_head.out_features == cfg.vocab_size and len(model.layers) == cfg.n_layers


def test_tiny_preset_runs_forward() -> None:
    model = build(ModelConfig.from_preset("tiny"))
    assert model(ids(1, 16, vocab=4096)).shape == (1, 16, 4096)


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(InputError, match=r"unknown preset 'gpt2-smal' \(did you mean 'gpt2-small'\?\)"):
        ModelConfig.from_preset("gpt2-smal")


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(InputError, match=r"unknown config key 'n_layer' \(did you mean 'n_layers'\?\)"):
        ModelConfig.from_preset("tiny", n_layer=2)
    with pytest.raises(InputError, match=r"did you mean 'rope_theta'"):
        ModelConfig.from_dict({"rope_theat": 1.0})


def test_unknown_component_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown mlp 'relu'; choose one of gelu"):
        Transformer(small_config(mlp="relu"))


def test_invalid_head_layout_is_an_input_error() -> None:
    with pytest.raises(InputError, match="multiple of n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(InputError, match="not divisible by n_heads"):
        small_config(d_model=30)


def test_config_json_round_trip(tmp_path) -> None:
    cfg = ModelConfig.from_preset("llama-20m", rope_scaling={"type": "linear", "factor": 2.0}, logit_softcap=30.0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg.to_dict(), "slmkit_version": "0.1.0"}))
    assert ModelConfig.load(path) == cfg
    assert ModelConfig.load(tmp_path) == cfg


def test_parse_overrides_reads_json_values() -> None:
    assert parse_overrides(["n_layers=6", "pos=alibi", 'rope_scaling={"type": "linear", "factor": 2}']) == {
        "n_layers": 6, "pos": "alibi", "rope_scaling": {"type": "linear", "factor": 2}}
    with pytest.raises(InputError, match="key=value"):
        parse_overrides(["n_layers"])


# ---------------------------------------------------------------------------- model directories
def test_model_dir_round_trip_gives_identical_logits(tmp_path) -> None:
    model = build(small_config(pos="learned", norm="layernorm", mlp="gelu_tanh", attn_bias=True, tie_embeddings=False))
    save_model_dir(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg == model.cfg
    x = ids(2, 10)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_loads_in_its_stored_dtype_unless_told_otherwise(tmp_path, dtype) -> None:
    from slmkit.model.io import cast_floats

    model = build(small_config())
    cast_floats(model, dtype)
    save_model_dir(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = ids(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and loaded(x).dtype == dtype
    as_fp32 = load_model(tmp_path / "m", dtype="float32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.embed_tokens.weight, model.embed_tokens.weight.float())


def test_truncated_weights_are_an_input_error(tmp_path) -> None:
    save_model_dir(build(small_config()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(tmp_path / "m")


def test_corrupt_weights_are_an_input_error(tmp_path) -> None:
    save_model_dir(build(small_config()), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(tmp_path / "m")


def test_weights_for_another_config_are_an_input_error(tmp_path) -> None:
    save_model_dir(build(small_config()), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_layers": 3}))
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(tmp_path / "m")


def test_missing_model_dir_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="not a model directory"):
        load_model(tmp_path)


def test_replace_derives_sizes_again_unless_they_were_set():
    base = ModelConfig.from_preset("tiny")  # d_model 256, 4 heads, 2 kv heads, gated MLP
    wider = base.replace(d_model=512)
    assert (wider.head_dim, wider.ffn_hidden, wider.n_kv_heads) == (128, 1408, 2)
    assert base.replace(n_heads=8, n_kv_heads=None).n_kv_heads == 8
    explicit = ModelConfig.from_preset("llama-1b")  # ffn_hidden 8192 set by the preset
    assert explicit.replace(d_model=1024, n_heads=16, n_kv_heads=4).ffn_hidden == 8192


# ---------------------------------------------------------------------------- decoding
def test_logits_to_keep_returns_the_last_positions() -> None:
    model = build(small_config())
    x = ids(2, 10)
    full = model(x)
    assert model(x, logits_to_keep=1).shape == (2, 1, 97)
    assert_close(model(x, logits_to_keep=1), full[:, -1:], TOL)  # a 1-row product may sum in another order
    assert_close(model(x, logits_to_keep=3), full[:, -3:], TOL)


@pytest.mark.parametrize("tied", [True, False])
def test_decoding_layout_keeps_values_and_round_trips(tmp_path, tied: bool) -> None:
    model = build(small_config(tie_embeddings=tied))
    head = model.lm_head.weight
    before, x = head.detach().clone(), ids(2, 10)
    logits = model(x)
    model.use_decoding_layout()
    assert model.lm_head.weight is head and not head.is_contiguous() and head.t().is_contiguous()
    assert torch.equal(head, before)
    assert (model.embed_tokens.weight is head) == tied
    assert_close(model(x), logits, TOL)
    save_model_dir(model, tmp_path / "m")  # saving puts the standard layout back
    assert head.is_contiguous() and torch.equal(load_model(tmp_path / "m").lm_head.weight, before)


def test_decoding_layout_still_trains() -> None:
    from slmkit.generation import generate_ids

    model = build(small_config(mlp="swiglu"))
    generate_ids(model, [[1, 2, 3]], 4)  # lays the weights out for decoding, from inside inference mode
    assert not model.layers[0].mlp.up_proj.weight.is_contiguous()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids(2, 10)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_decoding_layout_packs_and_transposes_then_unpacks() -> None:
    narrow = build(small_config(vocab_size=16, d_model=32, mlp="gelu"))  # vocab smaller than d
    narrow.use_decoding_layout()
    assert narrow.lm_head.weight.is_contiguous() and not narrow.layers[0].mlp.up_proj.weight.is_contiguous()
    model = build(small_config(mlp="swiglu", attn_bias=True, n_kv_heads=2))
    x = ids(2, 6)
    logits = model(x)
    model.use_decoding_layout()
    mlp, attn = model.layers[0].mlp, model.layers[0].self_attn
    q, k, v = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    assert mlp.down_proj.weight.is_contiguous()  # narrowing, alone: left as it is
    pointer = q.data_ptr()
    model.use_decoding_layout()
    assert attn.q_proj.weight.data_ptr() == pointer  # done once
    with torch.inference_mode():
        assert_close(model(x), logits, TOL)
        cache = model.new_cache(2)
        assert_close(torch.cat([model(x[:, :3], cache=cache), model(x[:, 3:], cache=cache)], 1), logits, TOL)
    model.use_decoding_layout(False)
    params = list(model.parameters())
    assert all(p.is_contiguous() for p in params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # none shares storage
    assert_close(model(x), logits, TOL)


def test_packed_weights_fall_back_when_a_parameter_gets_new_storage() -> None:
    model = build(small_config(mlp="swiglu"))
    x = ids(1, 5)
    model.use_decoding_layout()
    attn = model.layers[0].self_attn
    attn.k_proj.weight.data = torch.zeros_like(attn.k_proj.weight)  # no longer a view of the pack
    expected = Transformer(model.cfg).eval()
    expected.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert_close(model(x), expected(x), TOL)
    model.use_decoding_layout()  # packs again, with the new weights
    assert attn.packed.current([attn.q_proj, attn.k_proj, attn.v_proj])
    with torch.inference_mode():
        assert_close(model(x), expected(x), TOL)
