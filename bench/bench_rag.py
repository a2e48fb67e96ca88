"""Retrieval on the PEPs: quality of each retriever on the model-free eval set (bench/rag_peps_qa.py),
indexing throughput, query latency at the corpus' size and at 10x (synthetic growth), and the
approximate index's recall@10 against exact search.

    python bench/bench_rag.py ../shared/data/python-peps/peps_final_active_accepted.jsonl \
        --tokenizer MODEL_DIR --out runs/rag-bench [--docs all] [--rerank MODEL_DIR]

`--docs all` indexes all 404 PEPs; `--docs N` a deterministic sample of about N (every PEP that a
multi-hop question links, then an even stride over the rest), for machines where embedding the
whole corpus takes too long. The index is built once into OUT/index and reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rag_peps_qa import questions  # noqa: E402

from slmkit.rag import ChunkConfig, Index, Retriever, build_index  # noqa: E402
from slmkit.rag.chunking import Span  # noqa: E402
from slmkit.rag.evaluate import evaluate  # noqa: E402
from slmkit.rag.store import NewDocument  # noqa: E402
from slmkit.rag.vectors import ApproxIndex, ExactIndex  # noqa: E402

RETRIEVERS = ["bm25", "dense", "hybrid", "hybrid+mmr"]


def sample(records: list[dict], n: int | None) -> list[dict]:
    if n is None or n >= len(records):
        return records
    linked = {pep for q in questions(records) if q["kind"] == "multi-hop" for pep in q["doc_ids"]}
    rest = [r for r in records if str(r["pep"]) not in linked]
    stride = max(1, len(rest) // max(1, n - len(linked)))
    keep = linked | {str(r["pep"]) for r in rest[::stride]}
    return [r for r in records if str(r["pep"]) in keep]


def build(records: list[dict], out: Path, tokenizer: str) -> dict:
    corpus = out / "peps.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    started = time.perf_counter()
    report = build_index([corpus], out / "index", tokenizer, id_field="pep", chunking=ChunkConfig("tokens", 256, 32),
                         force=True, progress=True)
    wall = time.perf_counter() - started
    stats = {**report.to_dict(), "wall_seconds": wall, "documents": len(records),
             "chunks_per_second": report.chunks_added / report.chunk_seconds,
             "embeddings_per_second": report.chunks_added / report.embed_seconds}
    (out / "build.json").write_text(json.dumps(stats, indent=2))
    return stats


def latencies(index: Index, retriever: Retriever, queries: list[str], k: int = 10) -> dict:
    times = []
    for q in queries:
        started = time.perf_counter()
        retriever.search(index, q, k)
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "queries": len(ms)}


def grow(index_dir: Path, to: Path, factor: int, seed: int = 0) -> Index:
    """A copy of the index with (factor - 1) synthetic copies of every document: words shuffled
    within each chunk (new BM25 statistics), vectors jittered and renormalized."""
    if to.exists():
        shutil.rmtree(to)
    shutil.copytree(index_dir, to, ignore=shutil.ignore_patterns("vectors-*.usearch"))
    index = Index(to)
    store = index.store
    rng = np.random.default_rng(seed)
    documents = store.query("SELECT id, doc_id, source, metadata, text FROM documents")
    with store.transaction() as db:
        for copy in range(1, factor):
            for pk, doc_id, source, metadata, _ in documents:
                rows = store.query("SELECT start_char, end_char, tokens, heading, text, embedding FROM chunks "
                                   "WHERE document = ? ORDER BY ord", (pk,))
                texts, spans, vectors, offset = [], [], [], 0
                for _, _, tokens, heading, text, blob in rows:
                    words = text.split()
                    rng.shuffle(words)
                    piece = " ".join(words)
                    spans.append(Span(offset, offset + len(piece), tokens, heading))
                    texts.append(piece)
                    offset += len(piece) + 1
                    v = np.frombuffer(blob, np.float32) + rng.normal(0, 0.05, index.settings["embedder"]["dim"])
                    vectors.append(v / np.linalg.norm(v))
                store.insert_document(db, NewDocument(f"{doc_id}~{copy}", source, None, "synthetic", json.loads(metadata),
                                                      " ".join(texts), spans, np.array(vectors, np.float32)))
    return Index(to)


def ann_recall(index: Index, queries: np.ndarray, k: int = 10) -> dict:
    exact, approx = ExactIndex(index.store), ApproxIndex(index.store)
    recalls, exact_ms, approx_ms = [], [], []
    for q in queries:
        t = time.perf_counter()
        truth = {c for c, _ in exact.search(q, k)[:k]}
        exact_ms.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = {c for c, _ in approx.search(q, k)}
        approx_ms.append(time.perf_counter() - t)
        recalls.append(len(truth & found) / k)
    return {"recall@10": float(np.mean(recalls)), "exact_p50_ms": float(np.median(exact_ms) * 1000),
            "approx_p50_ms": float(np.median(approx_ms) * 1000), "chunks": int(index.store.counts()[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peps")
    parser.add_argument("--tokenizer", required=True, help="the answering model's directory (chunk sizes)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--docs", default="all", help="all, or about this many PEPs (default: all)")
    parser.add_argument("--rerank", metavar="MODEL_DIR", help="also hybrid+rerank with this model")
    parser.add_argument("--rerank-questions", type=int, default=60, help="questions for +rerank (default: 60)")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--skip-eval", action="store_true", help="only throughput, latency and ANN recall")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in Path(args.peps).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = sample(records, None if args.docs == "all" else int(args.docs))
    qa = questions(records)
    (out / "qa.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in qa), encoding="utf-8")
    results: dict = {"documents": len(records), "questions": len(qa)}
    if not (out / "build.json").is_file():
        build(records, out, args.tokenizer)
    results["build"] = json.loads((out / "build.json").read_text())
    if args.build_only:
        return
    index = Index(out / "index")
    results["retrievers"] = {}
    for name in RETRIEVERS if not args.skip_eval else []:
        result = evaluate(index, qa, Retriever(name), progress=False)
        results["retrievers"][name] = result.to_dict()
        print(result.table(), flush=True)
    if args.rerank and not args.skip_eval:
        from slmkit.rag.rerank import LikelihoodReranker

        reranker = LikelihoodReranker.load(args.rerank)
        subset = qa[:: max(1, len(qa) // args.rerank_questions)][: args.rerank_questions]
        for name, retriever in (("hybrid", Retriever("hybrid")), ("hybrid+rerank", Retriever("hybrid", reranker=reranker))):
            result = evaluate(index, subset, retriever, progress=False)
            results["retrievers"][f"{name} (rerank subset)"] = result.to_dict()
            print(result.table(), flush=True)
    queries = [q["question"] for q in qa[:: max(1, len(qa) // args.latency_queries)]][: args.latency_queries]
    vectors = np.array([index.embed_query(q) for q in queries])
    results["latency"] = {"1x": {name: latencies(index, Retriever(name), queries) for name in RETRIEVERS}}
    results["ann"] = {"1x": ann_recall(index, vectors)}
    grown = grow(out / "index", out / "index-10x", 10)
    grown._embedder = index.embedder
    results["latency"]["10x"] = {name: latencies(grown, Retriever(name), queries) for name in RETRIEVERS}
    results["ann"]["10x"] = ann_recall(grown, vectors)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("build", "latency", "ann")}, indent=2))


if __name__ == "__main__":
    main()
