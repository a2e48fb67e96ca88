"""Reference-based text metrics for `responses.jsonl`: exact match and token F1 (SQuAD-style,
on normalized text), ROUGE-L (rouge-score) and corpus BLEU (sacrebleu)."""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmkit.errors import InputError, MissingExtraError

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze whitespace (the SQuAD normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def read_responses(path: str | os.PathLike) -> list[dict[str, Any]]:
    """responses.jsonl -> records that have `response` (and, for reference metrics, `reference`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"responses file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise InputError(f"{path}:{number}: a response record needs a `response` string")
        rows.append({**row, "_source": f"{path}:{number}"})
    if not rows:
        raise InputError(f"{path} holds no responses; generate them with `slmkit eval generate`")
    return rows


def text_metrics(rows: Sequence[dict[str, Any]], strict: bool = False) -> dict[str, float]:
    """Mean exact match, token F1 and ROUGE-L F-measure, and corpus BLEU, over `rows`.

    ROUGE-L and BLEU need `slmkit[specialize]`; without it they are left out, or with `strict`
    a MissingExtraError says what to install."""
    for row in rows:
        if not isinstance(row.get("reference"), str):
            raise InputError(f"{row.get('_source', 'a response record')}: no `reference` text to compare with")
    predictions, references = [r["response"] for r in rows], [r["reference"] for r in rows]
    n = max(1, len(rows))
    scores = {
        "count": float(len(rows)),
        "empty_responses": float(sum(1 for p in predictions if not p.strip())),
        "exact_match": sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
    }
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        if strict:
            raise MissingExtraError("rouge-score and sacrebleu", "specialize") from None
        return scores
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores["rouge_l"] = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n
    scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    return scores
