"""Model responses for held-out instruction records, in the `responses.jsonl` shape that
`text-metrics` and `judge` read: {"instruction", "input", "reference", "response"}."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slmkit.chat import ChatFormat, split_answer, to_messages
from slmkit.errors import InputError
from slmkit.generation.api import generate_ids
from slmkit.generation.sampling import SamplingParams
from slmkit.model.transformer import Transformer


def generate_responses(
    model: Transformer,
    template: ChatFormat,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy responses for `records` (their answers, if any, become `reference`)."""
    tokenizer = template.tokenizer
    budget = model.cfg.context_length - max_new_tokens
    if budget < 1:
        raise InputError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in context {model.cfg.context_length}")
    out = []
    for i in tqdm(range(0, len(records), batch_size), desc="generate", unit="batch", disable=not progress):
        chunk = records[i : i + batch_size]
        prompts = [template.encode_record(_prompt_only(r)).prompt[-budget:] for r in chunk]
        for record, ids in zip(chunk, generate_ids(model, prompts, max_new_tokens, SamplingParams(temperature=0.0), template.stop_tokens)):
            ids = [t for t in ids if t not in template.stop_tokens]
            context, answer = split_answer(to_messages(record))
            out.append({
                "instruction": record.get("instruction", context[-1]["content"] if context else ""),
                "input": record.get("input", ""),
                "reference": answer or "",
                "response": tokenizer.decode(ids).strip(),
            })
    return out


def _prompt_only(record: dict[str, Any]) -> dict[str, Any]:
    if "messages" in record:
        return {**record, "messages": split_answer(to_messages(record))[0]}
    return {k: v for k, v in record.items() if k != "output"}


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    from slmkit._io import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def eval_generate(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int = 128,
    limit: int | None = None,
    fmt: str | None = None,
    skip_bad: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate greedy responses of a model directory for instruction records and write them to
    `out` (JSONL). The template and adapter default to the ones the model was tuned with (its
    chat template, as recorded in generation.json). `device` and `dtype` as for `slmkit.load`."""
    from slmkit.data.records import read_records
    from slmkit.model.io import generation_defaults, load

    defaults = generation_defaults(model_dir)
    adapter = adapter or defaults.get("adapter")
    if not template and not defaults.get("template"):
        raise InputError(f"{model_dir} does not say which prompt template it was tuned with; pass --template alpaca|chatml|model")
    model, tokenizer = load(model_dir, device, dtype)
    chat_format = ChatFormat.from_name(template, tokenizer, model_dir) if template else ChatFormat.for_model(model_dir, tokenizer)
    if adapter:
        from slmkit.model.lora import load_adapter

        load_adapter(model, Path(model_dir) / "adapters" / adapter, adapter)
    records = read_records(data, fmt=fmt, skip_bad=skip_bad).items[:limit]
    rows = generate_responses(model.eval(), chat_format, records, max_new_tokens, progress=progress)
    write_jsonl(out, rows)
    return rows
