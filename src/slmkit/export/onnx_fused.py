"""A decode graph for llama-style models written node by node from the weights, on ONNX Runtime's
fused CPU kernels (the layout onnxruntime-genai's model builder uses):

    x = Gather(embed, input_ids)                                 (tied embeddings: columns of lm_head)
    per layer:  h   = SimplifiedLayerNormalization(x)            (the first; later ones are fused below)
                a   = GroupQueryAttention(MatMul(h, Wqkv), past_key, past_value, seqlens_k, ...)
                h,x = SkipSimplifiedLayerNormalization(MatMul(a, Wo), x)   (residual add + norm in one)
                m   = MatMul(SiLU(MatMul(h, Wgate)) * MatMul(h, Wup), Wdown)
                h,x = SkipSimplifiedLayerNormalization(m, x)     (with the next layer's, or the final, norm)
    logits = MatMul(h, lm_head)

GroupQueryAttention rotates q and k itself (RoPE from cos/sin tables of every position), masks
causally, and appends the new keys and values in place to a KV buffer of fixed length that is
both its past input and its present output, so nothing is recomputed or copied per step. The
traced export (`torch.onnx.export`) recomputes positions, rotary tables and the mask at every step
and concatenates the whole cache; at small model sizes that overhead is most of the decode time.

    inputs   input_ids [batch, seq] int64, seqlens_k [batch] int32 (tokens in the cache after
             this call, minus 1), total_sequence_length [] int32 (the largest seqlens_k + 1),
             query_seqlens [batch] int32 (real tokens of each row in input_ids, at its start),
             past_key_values.N.key / .value [batch, kv_heads, max_sequence_length, head_dim]
    outputs  logits [batch, seq, vocab], present.N.key / .value (the same buffers)

Rows of a batch start at position 0 of the cache: row b holds its seqlens_k[b] + 1 tokens at
positions 0.., which are also their RoPE positions; a row's padding comes after its
query_seqlens[b] real tokens and never enters the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slmkit.config import ModelConfig
from slmkit.model.layers import rope_frequencies
from slmkit.model.transformer import Transformer

DEFAULT_OPSET = 21
LM_HEAD_NODE = "lm_head"  # the quantizers leave it in fp32, as they do in the traced graph (no initializer there)
FUSED_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "query_seqlens")


def unsupported_reason(cfg: ModelConfig) -> str | None:
    """Why the fused graph cannot express this config (None: it can). The traced export covers the rest."""
    checks = {
        "attention_kind is not mha": cfg.attention_kind != "mha",
        "ffn_kind is not dense": cfg.ffn_kind != "dense",
        "norm is not rmsnorm": cfg.norm != "rmsnorm" or cfg.norm_plus_one,
        "mlp is not swiglu": cfg.mlp != "swiglu",
        "pos is not rope over the whole head": cfg.pos != "rope" or (cfg.rope_dim or cfg.head_dim) != cfg.head_dim,
        "the model has biases": cfg.attn_bias or cfg.attn_out_bias or cfg.mlp_bias or cfg.lm_head_bias,
        "the model is not causal": not cfg.causal,
        "qk_norm is on": cfg.qk_norm,
        "a soft-cap is set": cfg.logit_softcap is not None or cfg.attn_softcap is not None,
        "embed_scale is on": cfg.embed_scale,
        "sliding_window is set": cfg.sliding_window is not None,
        "output_norms is on": cfg.output_norms,
        "fp8 is on": cfg.fp8 != "none",
    }
    reasons = [reason for reason, failed in checks.items() if failed]
    return "; ".join(reasons) or None


def _weight(t: torch.Tensor, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(t.detach().float().cpu().numpy()), name)


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles [context_length, head_dim / 2], as the model rotates."""
    angles = torch.arange(cfg.context_length, dtype=torch.float32)[:, None] * rope_frequencies(cfg)
    return angles.cos(), angles.sin()


def build_fused_decoder(model: Transformer, path: Path, opset: int | None = None, external_data: bool = False) -> None:
    """Write the fused decode graph of a llama-style `model` (see `unsupported_reason`) to `path`;
    `external_data` puts the weights beside it in `path`.data (needed past protobuf's 2 GiB)."""
    import onnx
    from onnx import TensorProto, helper

    cfg = model.cfg
    nodes, weights = [], []

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", name: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name or f"{outputs[0]}/{op}", domain=domain, **attrs))

    def linear(x: str, out: str, *modules: torch.nn.Linear, name: str = "") -> None:
        """x @ W^T of one Linear, or of several side by side (q, k and v in one MatMul)."""
        weight = f"{out}.weight"
        weights.append(_weight(torch.cat([m.weight for m in modules]).T, weight))
        node("MatMul", [x, weight], [out], name=name)

    def norm_weight(module, name: str) -> str:
        weights.append(_weight(module.weight, name))
        return name

    eps = cfg.norm_eps
    cos, sin = rotary_tables(cfg)
    weights += [_weight(cos, "cos_cache"), _weight(sin, "sin_cache")]
    if cfg.tie_embeddings:  # one table: the lm_head's [d, vocab] weight, gathered by column
        node("Gather", ["logits.weight", "input_ids"], ["embeddings.t"], axis=1)
        node("Transpose", ["embeddings.t"], ["embeddings"], perm=[1, 2, 0])
    else:
        weights.append(_weight(model.embed_tokens.weight, "embed_tokens.weight"))
        node("Gather", ["embed_tokens.weight", "input_ids"], ["embeddings"])
    residual = "embeddings"
    node("SimplifiedLayerNormalization", [residual, norm_weight(model.layers[0].input_layernorm, "layers.0.input_layernorm.weight")],
         ["layers.0.h"], axis=-1, epsilon=eps, stash_type=1)
    gqa = {"num_heads": cfg.n_heads, "kv_num_heads": cfg.n_kv_heads, "do_rotary": 1, "rotary_interleaved": 0}
    if cfg.attn_scale is not None:
        gqa["scale"] = float(cfg.attn_scale)
    for i, block in enumerate(model.layers):
        p, attn, mlp = f"layers.{i}", block.self_attn, block.mlp
        linear(f"{p}.h", f"{p}.self_attn.qkv_proj", attn.q_proj, attn.k_proj, attn.v_proj)
        node("GroupQueryAttention",
             [f"{p}.self_attn.qkv_proj", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
              "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache", *[""] * 7, "query_seqlens"],
             [f"{p}.self_attn.out", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft", **gqa)
        linear(f"{p}.self_attn.out", f"{p}.self_attn.o_proj", attn.o_proj)
        node("SkipSimplifiedLayerNormalization",
             [f"{p}.self_attn.o_proj", residual, norm_weight(block.post_attention_layernorm, f"{p}.post_attention_layernorm.weight")],
             [f"{p}.mlp.h", "", "", f"{p}.attn_residual"], domain="com.microsoft", epsilon=eps)
        linear(f"{p}.mlp.h", f"{p}.mlp.gate_proj", mlp.gate_proj)
        linear(f"{p}.mlp.h", f"{p}.mlp.up_proj", mlp.up_proj)
        node("Sigmoid", [f"{p}.mlp.gate_proj"], [f"{p}.mlp.gate_sigmoid"])
        node("Mul", [f"{p}.mlp.gate_proj", f"{p}.mlp.gate_sigmoid"], [f"{p}.mlp.act"])
        node("Mul", [f"{p}.mlp.act", f"{p}.mlp.up_proj"], [f"{p}.mlp.gated"])
        linear(f"{p}.mlp.gated", f"{p}.mlp.down_proj", mlp.down_proj)
        last = i == cfg.n_layers - 1
        nxt, gamma = ("final", model.norm) if last else (f"layers.{i + 1}", model.layers[i + 1].input_layernorm)
        node("SkipSimplifiedLayerNormalization",
             [f"{p}.mlp.down_proj", f"{p}.attn_residual", norm_weight(gamma, "norm.weight" if last else f"{nxt}.input_layernorm.weight")],
             [f"{nxt}.h", "", "", f"{p}.residual"], domain="com.microsoft", epsilon=eps)
        residual = f"{p}.residual"
    linear("final.h", "logits", model.lm_head, name=LM_HEAD_NODE)

    batch, seq, cache = "batch_size", "sequence_length", "max_sequence_length"
    kv_shape = [batch, cfg.n_kv_heads, cache, cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [batch]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, [batch])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv_shape))
    graph = helper.make_graph(nodes, "slmkit_decoder", inputs, outputs, weights)
    proto = helper.make_model(graph, producer_name="slmkit",
                              opset_imports=[helper.make_opsetid("", opset or DEFAULT_OPSET), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(proto, str(path), save_as_external_data=external_data, location=path.name + ".data")
