"""Generation on ONNX Runtime from an ONNX export directory (`slmkit export onnx`).

`OrtModel` offers what the decoding loops of `slmkit.generation.decode` use from a Transformer
(`cfg`, `device`, `new_cache`, a call with ids, mask and cache), so greedy decoding, sampling,
beam search and streaming all run unchanged on ONNX Runtime.

The KV cache never leaves ONNX Runtime: with I/O binding each step's `present` outputs stay
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
from slmkit.tokenizer import Tokenizer

OptLevel = Literal["disable", "basic", "extended", "all"]


class OrtCache:
    """Past keys and values of every layer as ONNX Runtime values, in input-name order."""

    def __init__(self, past: list, length: int = 0) -> None:
        self.past = past
        self.length = length

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, e.g. the surviving beams of beam search."""
        import onnxruntime as ort

        index = rows.cpu().numpy()
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[index])) for v in self.past]


class OrtModel:
    """An exported decoder on an ONNX Runtime session."""

    def __init__(self, directory: str | os.PathLike, opt_level: OptLevel = "all", save_optimized: str | None = None,
                 profile: bool = False, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("onnxruntime", "onnx") from None
        directory = Path(directory)
        path = directory / "model.onnx"
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
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> OrtCache:
        shape = (batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        empty = np.zeros(shape, dtype=np.float32)
        return OrtCache([self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: OrtCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (the last `logits_to_keep` positions when > 0);
        with a cache, only the new tokens are passed."""
        b, t = input_ids.shape
        cache = cache if cache is not None else self.new_cache(b)
        total = cache.length + t
        if total > self.cfg.context_length:
            raise InputError(f"sequence of {total} tokens is longer than the model's context length {self.cfg.context_length}")
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
        logits = torch.from_numpy(outputs[0].numpy())
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    def end_profiling(self) -> Path:
        """Stop profiling and return the path of ONNX Runtime's JSON trace."""
        return Path(self.session.end_profiling())


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
