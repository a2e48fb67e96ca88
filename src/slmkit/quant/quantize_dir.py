"""`quantize(model_dir, method=..., out=...)`: quantize a model directory and report what it cost.

The report (quant_report.md + quant_report.json in the output directory) gives the size on disk
before and after, held-out perplexity before and after, and batch-1 greedy decode tokens/s before
and after, and the group sizes chosen per layer when none was given. With `max_ppl_increase` a
result over budget raises `QualityBudgetError` and nothing is written.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slmkit._io import atomic_dir, write_json, write_text_atomic
from slmkit.data.corpus import Corpus
from slmkit.errors import InputError, OutputExistsError, QualityBudgetError
from slmkit.eval.perplexity import perplexity_of_texts
from slmkit.generation import generate_ids
from slmkit.model.io import load, save_model_dir
from slmkit.model.transformer import Transformer
from slmkit.quant.calibration import calibration_windows
from slmkit.quant.methods import (
    GROUPED_BY_DEFAULT,
    NEEDS_CALIBRATION,
    check_method,
    group_size_summary,
    group_sizes,
    quantize_model,
)
from slmkit.tokenizer import Tokenizer

REPORT = "quant_report"
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------------------- measuring
def held_out_texts(tokenizer: Tokenizer, paths: Sequence[str | os.PathLike], max_tokens: int) -> list[str]:
    """The documents of `paths`, cut after `max_tokens` tokens in all."""
    texts, total = [], 0
    try:
        for text in Corpus(list(paths)):
            ids = tokenizer.encode_ordinary(text)
            if total + len(ids) > max_tokens:
                texts.append(tokenizer.decode(ids[: max_tokens - total]))
                break
            texts.append(text)
            total += len(ids)
    except InputError as e:
        raise InputError(f"held-out text: {e}") from None
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"the held-out text {', '.join(map(str, paths))} is empty; pass --eval FILES with text")
    return texts


@torch.no_grad()
def decode_tokens_per_s(model: Transformer, prompt: list[int], new_tokens: int = 64, repeats: int = 3) -> float:
    """Batch-1 greedy decode speed (median of `repeats` runs after a warm-up), prefill included."""
    new_tokens = min(new_tokens, model.cfg.context_length - len(prompt))
    generate_ids(model, [prompt], max_new_tokens=4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_ids(model, [prompt], max_new_tokens=new_tokens)
        times.append((time.perf_counter() - start) / max(1, len(out[0])))
    return 1 / statistics.median(times)


def weights_bytes(directory: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


@dataclass
class QuantReport:
    method: str
    settings: dict[str, Any]
    size_before: int  # bytes of the weight files
    size_after: int
    perplexity_before: float
    perplexity_after: float
    tokens_per_s_before: float
    tokens_per_s_after: float
    eval_tokens: int
    eval_files: list[str]
    eval_context: int  # tokens per scoring window
    calibration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"  # where the model ran for the measurements
    dtype: str = "float32"

    @property
    def ppl_increase_pct(self) -> float:
        return 100 * (self.perplexity_after / self.perplexity_before - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_increase_pct": self.ppl_increase_pct,
                "size_ratio": self.size_after / self.size_before,
                "speedup": self.tokens_per_s_after / self.tokens_per_s_before}

    def markdown(self) -> str:
        rows = [
            ("size on disk (weights)", f"{self.size_before / 1e6:.2f} MB", f"{self.size_after / 1e6:.2f} MB",
             f"{self.size_after / self.size_before:.2f}x"),
            ("perplexity (held-out)", f"{self.perplexity_before:.4f}", f"{self.perplexity_after:.4f}",
             f"{self.ppl_increase_pct:+.2f}%"),
            ("decode tokens/s (batch 1)", f"{self.tokens_per_s_before:.1f}", f"{self.tokens_per_s_after:.1f}",
             f"{self.tokens_per_s_after / self.tokens_per_s_before:.2f}x"),
        ]
        lines = [f"# Quantization report: {self.method}", "",
                 "Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), "",
                 "| | before | after | change |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines += ["", f"Perplexity on {self.eval_tokens} tokens of {', '.join(self.eval_files)}, in windows of "
                      f"{self.eval_context} tokens (half of each window scored as context for the next)."]
        if self.calibration:
            lines.append(f"Calibration: {self.calibration['samples']} windows of {self.calibration['seq_len']} tokens "
                         f"from {', '.join(self.calibration['files'])}.")
        lines += self.notes
        lines.append(f"Embeddings and lm_head stay in full precision; decode speed is PyTorch eager on this machine "
                     f"({self.device}, {self.dtype}).")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the whole job
def quantize(
    model_dir: str | os.PathLike,
    method: str,
    out: str | os.PathLike,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    calib: Sequence[str | os.PathLike] | None = None,
    calib_samples: int = 128,
    calib_seq_len: int | None = None,
    eval_paths: Sequence[str | os.PathLike] | None = None,
    eval_tokens: int = 16384,
    eval_context: int = 512,
    alpha: float = 0.5,
    act_order: bool = False,
    damp: float = 0.01,
    max_ppl_increase: float | None = None,
    seed: int = 0,
    force: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = False,
) -> QuantReport:
    """Quantize the model in `model_dir` with `method` and write a quantized model directory with
    its quality report to `out`. Held-out text (`eval_paths`) defaults to the calibration files; the
    report scores its first `eval_tokens` tokens in windows of `eval_context` (at most the model's
    context): perplexity over a model's full context would cost far more than the quantization.
    The model runs on `device` in `dtype` (as for `slmkit.load`), which is also the dtype of the
    weights that stay in full precision."""
    check_method(method, group_size)  # bad method or group size: fail before any work
    if Path(out).exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    if method in NEEDS_CALIBRATION and not calib:
        raise InputError(f"{method} needs calibration text: pass --calib FILES (text like the model's domain)")
    eval_paths = list(eval_paths or calib or [])
    if not eval_paths:
        raise InputError("the quality report needs held-out text: pass --eval FILES")
    if eval_tokens < 1 or eval_context < 2:
        raise InputError(f"--eval-tokens must be >= 1 and --eval-context >= 2, not {eval_tokens} and {eval_context}")
    if max_ppl_increase is not None and max_ppl_increase < 0:
        raise InputError(f"--max-ppl-increase must be >= 0 percent, not {max_ppl_increase}")
    model, tokenizer = load(model_dir, device, dtype)
    sizes = group_sizes(model, method, group_size)  # a group size that does not fit: fail before calibrating
    chosen = group_size_summary(model, sizes) if group_size is None and method in GROUPED_BY_DEFAULT else None

    calib_ids, calibration = None, None
    if method in NEEDS_CALIBRATION:
        seq_len = calib_seq_len or min(512, model.cfg.context_length)
        calib_ids = calibration_windows(tokenizer, calib, calib_samples, seq_len, seed)
        calibration = {"files": [str(p) for p in calib], "samples": len(calib_ids), "seq_len": calib_ids.shape[1]}
    texts = held_out_texts(tokenizer, eval_paths, eval_tokens)
    prompt = tokenizer.encode_ordinary(texts[0])[:16] or [tokenizer.eot_id]
    context = min(eval_context, model.cfg.context_length)
    before = perplexity_of_texts(model, tokenizer, texts, context=context, progress=progress)
    tps_before = decode_tokens_per_s(model, prompt)
    torch.manual_seed(seed)
    section = quantize_model(model, method, group_size=group_size, symmetric=symmetric, calib_ids=calib_ids,
                             alpha=alpha, act_order=act_order, damp=damp, progress=progress)
    after = perplexity_of_texts(model, tokenizer, texts, context=context, progress=progress)
    tps_after = decode_tokens_per_s(model, prompt)
    increase = 100 * (after.perplexity / before.perplexity - 1)
    if max_ppl_increase is not None and not increase <= max_ppl_increase:
        raise QualityBudgetError(f"{method} raises perplexity by {increase:.2f}% ({before.perplexity:.3f} -> "
                                 f"{after.perplexity:.3f}), over the budget of {max_ppl_increase}%; nothing written")

    settings = {k: v for k, v in section.items() if k not in ("method", "modules", "smoothed", "group_sizes")}
    if "group_size" in settings and settings["group_size"] is None:
        settings["group_size"] = "per tensor" if method == "fp8" else "per channel"
    if chosen:
        settings["group_size"] = chosen
    with atomic_dir(out, force=force) as tmp:
        for path in Path(model_dir).iterdir():  # tokenizer, generation settings, labels
            if path.is_file() and path.name not in _MODEL_FILES and not path.name.endswith(".safetensors") \
                    and not path.name.startswith(REPORT):
                shutil.copy2(path, tmp / path.name)
        save_model_dir(model, tmp, quantization=section)
        report = QuantReport(method, settings, weights_bytes(model_dir), weights_bytes(tmp), before.perplexity,
                             after.perplexity, tps_before, tps_after, before.tokens, [str(p) for p in eval_paths],
                             context, calibration, device=str(model.embed_tokens.weight.device),
                             dtype=str(model.embed_tokens.weight.dtype).removeprefix("torch."))
        if not math.isfinite(after.perplexity):
            report.notes.append("The quantized model's perplexity is not finite: its outputs overflow.")
        if eval_paths == list(calib or []):
            report.notes.append("Perplexity was measured on the calibration text (no --eval given): it flatters "
                                "calibrated methods.")
        write_text_atomic(tmp / f"{REPORT}.md", report.markdown())
        write_json(tmp / f"{REPORT}.json", report.to_dict())
    return report
