"""`slmkit rag eval`: retrieval quality at document level on a QA file, and answer quality.

A QA record is {"question": ..., "doc_ids": [...]} (the documents that answer it), optionally
with "answer" (a short answer string) and "kind" (a label the report breaks results down by).
A ranking of chunks becomes a ranking of documents by each document's best chunk. With a
generator, questions that have an answer are also answered from the top `answer_k` chunks:
exact match and token F1 against the answer, and citation precision (the share of citations
whose chunk contains the answer string).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmkit.data.records import read_records
from slmkit.errors import InputError
from slmkit.eval.retrieval import bootstrap_ci, per_question
from slmkit.eval.text_metrics import normalize, token_f1
from slmkit.rag.answer import Generator, respond
from slmkit.rag.index import Index
from slmkit.rag.retrieve import Retriever

CHUNKS_PER_QUESTION = 100  # enough chunks to rank 20 distinct documents


@dataclass
class EvalResult:
    retriever: str
    questions: int
    metrics: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    answers: dict[str, float] = field(default_factory=dict)
    seconds_per_query: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics, "retriever": self.retriever, "questions": self.questions,
                "ci95": {k: list(v) for k, v in self.ci95.items()}, "by_kind": self.by_kind, **self.answers,
                "seconds_per_query": self.seconds_per_query}

    def table(self) -> str:
        lines = [f"{self.retriever}: {self.questions} questions, {self.seconds_per_query * 1000:.1f} ms per query",
                 f"{'metric':<12}{'value':>8}   95% CI"]
        for name, value in self.metrics.items():
            lo, hi = self.ci95[name]
            lines.append(f"{name:<12}{value:>8.3f}   [{lo:.3f}, {hi:.3f}]")
        for kind, values in self.by_kind.items():
            lines.append(f"{kind + ':':<12} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
        for name, value in self.answers.items():
            lines.append(f"{name:<20}{value:>8.3f}")
        return "\n".join(lines)


def read_qa(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = read_records(path, ("question", "doc_ids")).items
    for r in records:
        if not isinstance(r["doc_ids"], list) or not all(isinstance(d, (str, int)) for d in r["doc_ids"]):
            raise InputError(f"{r['_source']}: doc_ids must be a list of document ids")
        r["doc_ids"] = [str(d) for d in r["doc_ids"]]
    return records


def document_ranking(doc_ids: list[str]) -> list[str]:
    return list(dict.fromkeys(doc_ids))


def evaluate(index: Index, qa: str | os.PathLike | list[dict[str, Any]], retriever: Retriever | None = None, *,
             generator: Generator | None = None, answer_k: int = 5, max_tokens: int = 64, limit: int | None = None,
             progress: bool = True, seed: int = 0) -> EvalResult:
    from tqdm.auto import tqdm

    retriever = retriever or Retriever()
    records = read_qa(qa) if not isinstance(qa, list) else qa
    records = records[:limit] if limit else records
    rankings, judgements, seconds = [], [], 0.0
    em, f1, cited, supported = [], [], 0, 0
    for record in tqdm(records, desc=f"eval {retriever.name}", unit="q", disable=not progress):
        started = time.perf_counter()
        hits = retriever.search(index, record["question"], CHUNKS_PER_QUESTION)
        seconds += time.perf_counter() - started
        rankings.append(document_ranking([h.chunk.doc_id for h in hits]))
        judgements.append(set(record["doc_ids"]))
        if generator is not None and isinstance(record.get("answer"), str):
            reply = respond(record["question"], hits[:answer_k], generator, max_tokens=max_tokens)
            em.append(float(normalize(reply.text) == normalize(record["answer"])))
            f1.append(token_f1(reply.text, record["answer"]))
            wanted = normalize(record["answer"])
            cited += len(reply.citations)
            supported += sum(1 for c in reply.citations if wanted and wanted in normalize(reply.sources[c.n - 1].chunk.text))
    values = per_question(rankings, judgements)
    metrics = {name: float(v.mean()) for name, v in values.items()}
    ci = {name: bootstrap_ci(v, seed=seed) for name, v in values.items()}
    kinds = sorted({r.get("kind") for r in records if isinstance(r.get("kind"), str)})
    by_kind = {}
    for kind in kinds:
        mask = np.array([r.get("kind") == kind for r in records])
        by_kind[kind] = {"questions": int(mask.sum()), "recall@10": float(values["recall@10"][mask].mean()),
                         "mrr@10": float(values["mrr@10"][mask].mean())}
    answers = {}
    if em:
        answers = {"answered": float(len(em)), "exact_match": float(np.mean(em)), "token_f1": float(np.mean(f1)),
                   "citation_precision": supported / cited if cited else 0.0}
    return EvalResult(retriever.name + ("+rerank" if retriever.reranker is not None else ""), len(records), metrics, ci,
                      by_kind, answers, seconds / max(1, len(records)))
