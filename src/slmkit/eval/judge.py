"""LLM-as-judge: score each response 0-100 against a rubric with any OpenAI-compatible
chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama, `slmkit serve`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from slmkit.errors import InputError, MissingExtraError

RUBRIC = (
    "You are grading the response of an assistant to an instruction. Compare it with the reference answer "
    "and score it from 0 to 100: 100 is fully correct, complete and well written; 50 is partly correct; "
    "0 is wrong, empty or off-topic. Reply with the integer score only."
)
_SCORE = re.compile(r"\b(100|\d{1,2})\b")


@dataclass
class JudgeResult:
    scores: list[int | None]  # None where the judge's reply held no score

    @property
    def valid(self) -> list[int]:
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float:
        return sum(self.valid) / len(self.valid) if self.valid else float("nan")

    def distribution(self, width: int = 20) -> dict[str, int]:
        """Counts per score bucket: 0-19, 20-39, ..., 80-100."""
        buckets: dict[str, int] = {}
        for lo in range(0, 100, width):
            hi = 100 if lo + width >= 100 else lo + width - 1
            buckets[f"{lo}-{hi}"] = sum(1 for s in self.valid if lo <= s <= hi)
        return buckets

    def to_dict(self) -> dict[str, Any]:
        return {"count": len(self.scores), "scored": len(self.valid), "mean": self.mean,
                "distribution": self.distribution(), "scores": self.scores}


def judge_prompt(row: dict[str, Any]) -> str:
    instruction = row.get("instruction", "") + (f"\n\n{row['input']}" if row.get("input") else "")
    return (f"Instruction:\n{instruction}\n\nReference answer:\n{row.get('reference', '')}\n\n"
            f"Assistant's response:\n{row['response']}\n\nScore (0-100):")


def parse_score(text: str | None) -> int | None:
    match = _SCORE.search(text or "")
    return int(match.group(1)) if match else None


def judge(rows: Sequence[dict[str, Any]], base_url: str, model: str, *, api_key: str = "not-needed",
          rubric: str = RUBRIC, client: Any = None, progress: bool = False) -> JudgeResult:
    """Ask the judge model at `base_url` (…/v1) for a score per row, at temperature 0."""
    if client is None:
        try:
            import openai
        except ImportError:
            raise MissingExtraError("openai", "specialize") from None
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=1)
    scores: list[int | None] = []
    for row in tqdm(rows, desc="judge", unit="response", disable=not progress):
        try:
            reply = client.chat.completions.create(
                model=model, temperature=0.0, max_tokens=8,
                messages=[{"role": "system", "content": rubric}, {"role": "user", "content": judge_prompt(row)}],
            )
        except Exception as e:  # openai raises APIConnectionError, APIStatusError, ...
            if type(e).__module__.startswith("openai"):
                raise InputError(f"the judge at {base_url} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
            raise
        scores.append(parse_score(reply.choices[0].message.content))
    return JudgeResult(scores)
