"""Generation on ONNX Runtime from an ONNX export directory (`slmkit export onnx`).

`OrtModel` offers what the decoding loops of `slmkit.generation.decode` use from a Transformer
(`cfg`, `device`, `new_cache`, a call with ids, mask and cache), so greedy decoding, sampling,
beam search and streaming all run unchanged on ONNX Runtime. It runs both graph kinds the
exporter writes:

- fused (llama-style models, `slmkit.export.onnx_fused`): the KV cache is one preallocated
  buffer per layer and tensor, bound once as both the past input and the present output, so
  GroupQueryAttention appends in place. A step only writes the new token ids and the per-row
  lengths into arrays already bound to the graph and runs it. Left-padded rows are moved to
  the front of the cache (padding never enters it), and logits at padding positions are zeros.
- traced (`torch.onnx.export`, every other config): each step's `present` outputs stay
  ORT-allocated values and are bound as the next step's `past` inputs, with no copy through numpy.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from slmkit.config import ModelConfig
from slmkit.errors import InputError, MissingExtraError
from slmkit.model.cache import DecodingCache
from slmkit.tokenizer import Tokenizer

OptLevel = Literal["disable", "basic", "extended", "all"]


class OrtCache(DecodingCache):
    """Traced graph: past keys and values of every layer as ONNX Runtime values, in input-name order."""

    def __init__(self, past: list, length: int = 0) -> None:
        self.past = past
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        import onnxruntime as ort

        index = rows.cpu().numpy()
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[index])) for v in self.past]


class FusedCache(DecodingCache):
    """Fused graph: a [batch, kv_heads, max_len, head_dim] buffer per layer and tensor, shared by
    the graph's past inputs and present outputs, and the number of tokens each row holds.

    The arrays the graph reads (ids, lengths) live here too, bound once into one I/O binding;
    a step writes into them in place. `length` counts columns of the caller's attention mask."""

    def __init__(self, model: OrtModel, batch_size: int, max_len: int) -> None:
        cfg = model.cfg
        self.model, self.max_len, self.length = model, max_len, 0
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.buffers = [np.zeros(shape, dtype=np.float32) for _ in model.past_names]
        self.rows = np.zeros(batch_size, dtype=np.int32)  # tokens held by each row
        self.seqlens_k = np.zeros(batch_size, dtype=np.int32)
        self.query_seqlens = np.zeros(batch_size, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.ids = self.logits = np.zeros((0, 0), dtype=np.int64)
        self.binding = None

    def bind(self, t: int) -> None:
        """(Re)build the I/O binding around the current buffers, for calls of `t` new tokens."""
        ort, session = self.model._ort, self.model.session
        value = ort.OrtValue.ortvalue_from_numpy
        b = len(self.rows)
        self.ids = np.zeros((b, t), dtype=np.int64)
        self.logits = np.zeros((b, t, self.model.cfg.vocab_size), dtype=np.float32)
        binding = session.io_binding()
        arrays = {"input_ids": self.ids, "seqlens_k": self.seqlens_k, "total_sequence_length": self.total,
                  "query_seqlens": self.query_seqlens}
        for name, array in arrays.items():
            binding.bind_ortvalue_input(name, value(array))
        binding.bind_ortvalue_output("logits", value(self.logits))
        for past, present, buffer in zip(self.model.past_names, self.model.present_names, self.buffers):
            shared = value(buffer)
            binding.bind_ortvalue_input(past, shared)
            binding.bind_ortvalue_output(present, shared)
        self.binding = binding

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        index = rows.cpu().numpy()
        self.buffers = [np.ascontiguousarray(buffer[index]) for buffer in self.buffers]
        self.rows = np.ascontiguousarray(self.rows[index])
        self.seqlens_k, self.query_seqlens = np.zeros_like(self.rows), np.zeros_like(self.rows)
        self.binding = None


class OrtModel:
    """An exported decoder on an ONNX Runtime session. `directory` is an export directory (or a
    .onnx file inside one)."""

    def __init__(self, directory: str | os.PathLike, opt_level: OptLevel = "all", save_optimized: str | None = None,
                 profile: bool = False, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("onnxruntime", "onnx") from None
        path = Path(directory)
        path, directory = (path, path.parent) if path.suffix == ".onnx" else (path / "model.onnx", path)
        if not path.is_file():
            raise InputError(f"{directory} is not an ONNX export directory (no model.onnx); create one with `slmkit export onnx`")
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if opt_level not in levels:
            raise InputError(f"unknown graph optimization level {opt_level!r}; choose one of {', '.join(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[opt_level]
        if save_optimized:
            options.optimized_model_filepath = str(save_optimized)
        if threads:
            options.intra_op_num_threads = threads
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(directory / "ort_profile")
        self.cfg = ModelConfig.load(directory)
        self.device = torch.device("cpu")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._ort = ort
        names = [i.name for i in self.session.get_inputs()]
        self.fused = "seqlens_k" in names
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> OrtCache | FusedCache:
        if self.fused:
            return FusedCache(self, batch_size, min(max_len or self.cfg.context_length, self.cfg.context_length))
        shape = (batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        empty = np.zeros(shape, dtype=np.float32)
        return OrtCache([self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: OrtCache | FusedCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (the last `logits_to_keep` positions when > 0);
        with a cache, only the new tokens are passed."""
        b, t = input_ids.shape
        cache = cache if cache is not None else self.new_cache(b)
        total = cache.length + t
        if total > self.cfg.context_length:
            raise InputError(f"sequence of {total} tokens is longer than the model's context length {self.cfg.context_length}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, total):
            raise InputError(f"attention_mask must have shape {(b, total)}, not {tuple(attention_mask.shape)}")
        run = self._run_fused if self.fused else self._run_traced
        logits = run(input_ids, attention_mask, cache)
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def _run_traced(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: OrtCache) -> torch.Tensor:
        b, t = input_ids.shape
        total = cache.length + t
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64))
        for name, value in zip(self.past_names, cache.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.past, cache.length = outputs[1:], total
        return torch.from_numpy(outputs[0].numpy())

    def _run_fused(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: FusedCache) -> torch.Tensor:
        b, t = input_ids.shape
        if cache.length + t > cache.max_len:
            raise InputError(f"the cache holds {cache.max_len} tokens; {cache.length + t} do not fit (new_cache(max_len=...))")
        ids = input_ids.cpu().numpy()
        new = np.full(b, t, dtype=np.int32)
        if attention_mask is not None:
            new = _left_padded_lengths(attention_mask[:, cache.length:].cpu().numpy(), cache.length)
        padded = bool((new != t).any())
        if cache.binding is None or cache.ids.shape != (b, t):
            cache.bind(t)
        cache.ids[...] = ids
        if padded:  # move each row's tokens to the front: row r holds its new[r] tokens at positions 0..
            for row, n in enumerate(new.tolist()):
                cache.ids[row, :n], cache.ids[row, n:] = ids[row, t - n:], 0
        cache.query_seqlens[...] = new
        cache.rows += new
        np.subtract(cache.rows, 1, out=cache.seqlens_k)
        cache.total[...] = cache.rows.max()
        self.session.run_with_iobinding(cache.binding)
        cache.length += t
        logits = torch.from_numpy(cache.logits.copy())  # the buffer is overwritten by the next call
        if padded:  # and back: a row's logits end at the last column; padding positions stay zero
            out = torch.zeros_like(logits)
            for row, n in enumerate(new.tolist()):
                out[row, t - n:] = logits[row, :n]
            logits = out
        return logits

    def end_profiling(self) -> Path:
        """Stop profiling and return the path of ONNX Runtime's JSON trace."""
        return Path(self.session.end_profiling())


def _left_padded_lengths(new_mask: np.ndarray, past: int) -> np.ndarray:
    """Real tokens per row among the new columns of an attention mask. The fused graph takes what
    `slmkit.generation.decode` makes: left padding in the first call (at least one token per row),
    ones after it."""
    counts = new_mask.sum(axis=1).astype(np.int32)
    t = new_mask.shape[1]
    left_padded = all(n and bool(row[t - n:].all()) for row, n in zip(new_mask, counts.tolist()))
    if not left_padded or (past and (counts != t).any()):
        raise InputError("the fused ONNX graph takes left-padded attention masks (padding before the first "
                         "call's tokens only); export with --graph traced for other masks")
    return counts


def load_onnx(directory: str | os.PathLike, opt_level: OptLevel = "all", save_optimized: str | None = None,
              profile: bool = False) -> tuple[OrtModel, Tokenizer]:
    """An ONNX export directory -> (ONNX Runtime model, tokenizer)."""
    return OrtModel(directory, opt_level, save_optimized, profile), Tokenizer.load(directory)


def top_operators(trace: str | os.PathLike, n: int = 10) -> list[tuple[str, float, int]]:
    """(operator type, total milliseconds, calls) of the n most expensive operators in an ORT
    profile trace, most expensive first."""
    events = json.loads(Path(trace).read_text(encoding="utf-8"))
    time_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in events:
        op = event.get("args", {}).get("op_name")
        if event.get("cat") == "Node" and op and event.get("name", "").endswith("_kernel_time"):
            time_us[op] += event.get("dur", 0)
            calls[op] += 1
    ranked = sorted(time_us, key=time_us.get, reverse=True)[:n]
    return [(op, time_us[op] / 1000, calls[op]) for op in ranked]
