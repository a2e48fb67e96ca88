"""`slmkit rag index|add|remove|query|serve|eval`."""

from __future__ import annotations

import argparse
import json

from slmkit.cli.common import check_writable, device_options, reading_options
from slmkit.errors import InputError


def _pairs(pairs: list[str], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"{option} takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def _retriever(args: argparse.Namespace):
    from slmkit.rag import Retriever

    reranker = None
    if args.rerank:
        from slmkit.rag.rerank import LikelihoodReranker

        reranker = LikelihoodReranker.load(args.rerank, args.device, args.dtype)
    return Retriever(args.retriever, candidates=args.candidates, mmr_lambda=args.mmr_lambda, reranker=reranker)


def _generator(args: argparse.Namespace, index):
    from slmkit.rag import load_generator

    generator = load_generator(args.model, model=args.served_model, api_key=args.api_key, context=args.context,
                               tokenizer=index.tokenizer if args.context else None, device=args.device,
                               dtype=args.dtype)
    if hasattr(generator, "tokenizer") and not args.model.startswith(("http://", "https://")):
        index.check_tokenizer(generator.tokenizer, args.model)
    return generator


def cmd_index(args: argparse.Namespace) -> None:
    from slmkit.rag import ChunkConfig, build_index

    check_writable(args.out)
    report = build_index(args.paths, args.out, args.tokenizer, embedder=args.embedder, pooling=args.pooling,
                         embedder_model=args.embedder_model, chunking=ChunkConfig(args.chunk, args.chunk_size, args.overlap),
                         id_field=args.id_field, text_field=args.text_field, metadata=_pairs(args.meta, "--meta"),
                         qdrant=args.qdrant, collection=args.collection, ann_threshold=args.ann_threshold,
                         errors=args.errors, skip_unreadable=args.skip_unreadable, force=args.force, device=args.device,
                         progress=not args.quiet)
    print(report.summary())
    print(f"wrote {args.out}")


def cmd_add(args: argparse.Namespace) -> None:
    from slmkit.rag import add

    print(add(args.index, args.paths, metadata=_pairs(args.meta, "--meta"), errors=args.errors,
              skip_unreadable=args.skip_unreadable, progress=not args.quiet).summary())


def cmd_remove(args: argparse.Namespace) -> None:
    from slmkit.rag import remove

    print(remove(args.index, args.targets).summary())


def cmd_query(args: argparse.Namespace) -> None:
    from slmkit.rag import Index, answer, parse_filters

    index = Index(args.index, device=args.device)
    try:
        retriever, filters = _retriever(args), parse_filters(args.filter)
        if args.model is None:
            hits = retriever.search(index, args.question, args.top_k, filters)
            if args.json:
                print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
            for n, h in enumerate(hits if not args.json else [], 1):
                heading = f" ({h.chunk.heading})" if h.chunk.heading else ""
                print(f"[{n}] {h.score:.4f} {h.chunk.doc_id}{heading} chars {h.chunk.start}-{h.chunk.end}")
                print("    " + " ".join(h.chunk.text.split())[:300])
            return
        reply = answer(index, args.question, _generator(args, index), retriever=retriever, k=args.top_k, filters=filters,
                       max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        print(json.dumps(reply.to_dict(), ensure_ascii=False, indent=2) if args.json else reply.render())
    finally:
        index.close()


def cmd_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from slmkit.rag import Index
    from slmkit.rag.serve import serve

    indexes = {}
    for spec in args.indexes:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        indexes[name] = path
    first = Index(next(iter(indexes.values())))
    generator = _generator(args, first)
    first.close()
    serve(indexes, generator, args.host, args.port, retriever=_retriever(args), k=args.top_k,
          max_tokens=args.max_tokens, api_key=args.api_key_required)


def cmd_eval(args: argparse.Namespace) -> None:
    from slmkit.rag import Index
    from slmkit.rag.evaluate import evaluate

    index = Index(args.index, device=args.device)
    try:
        generator = _generator(args, index) if args.model else None
        result = evaluate(index, args.qa, _retriever(args), generator=generator, answer_k=args.top_k,
                          max_tokens=args.max_tokens, limit=args.limit, progress=not args.quiet and not args.json)
    finally:
        index.close()
    print(json.dumps(result.to_dict()) if args.json else result.table())


def _search_options(p: argparse.ArgumentParser) -> None:
    from slmkit.rag.retrieve import retriever_names

    p.add_argument("--retriever", default="hybrid", choices=retriever_names(),
                   help="bm25 (FTS5), dense (vectors), hybrid (reciprocal-rank fusion of both, k=60); +mmr diversifies "
                        "the results (default: hybrid)")
    p.add_argument("--candidates", type=int, default=50, metavar="N",
                   help="chunks each ranking contributes before fusion, reranking and MMR (default: 50)")
    p.add_argument("--mmr-lambda", type=float, default=0.5, metavar="L",
                   help="MMR's weight of relevance against redundancy, 0 to 1 (default: 0.5)")
    p.add_argument("--rerank", metavar="MODEL_DIR",
                   help="rerank the top 20 candidates by the log-likelihood this slmkit model gives the question "
                        "after each passage")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="chunks to return or to answer from (default: 5)")


def _answer_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, metavar="MODEL_DIR_OR_URL",
                   help="the answering model: a slmkit model directory or an OpenAI-compatible server's URL")
    p.add_argument("--served-model", metavar="NAME", help="model name at the URL (default: the first it lists)")
    p.add_argument("--api-key", metavar="KEY", help="API key of the URL (default: $OPENAI_API_KEY)")
    p.add_argument("--context", type=int, metavar="N",
                   help="context length of the model at the URL, to fit the sources into it (a model directory knows its own)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N", help="answer length limit (default: 256)")
    device_options(p)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.rag.chunking import METHODS
    from slmkit.rag.embedders import MINILM
    from slmkit.rag.vectors import DEFAULT_ANN_THRESHOLD

    rag = commands.add_parser("rag", help="retrieval-augmented answers over your documents",
                              description="Index documents (chunks, embeddings, BM25), keep the index current, search "
                                          "it, and answer questions from it with citations.")
    cmds = rag.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("index", parents=[common], help="build an index of documents",
                        description="Read documents as `data prepare` does, cut them into chunks counted in the answering "
                                    "model's tokens, embed them, and store chunks, metadata, an FTS5 (BM25) table and the "
                                    "vectors in one index directory.")
    p.add_argument("paths", nargs="+", metavar="DOCS", help="files or directories (.txt .md .rst .py .jsonl .csv .tsv)")
    p.add_argument("--out", required=True, metavar="INDEX", help="index directory to create")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="the answering model's directory (or a tokenizer directory): chunk sizes are counted in its tokens")
    p.add_argument("--chunk", choices=METHODS, default="tokens",
                   help="tokens: overlapping windows; sentences: whole sentences; semantic: sentences grouped by "
                        "embedding similarity (default: tokens)")
    p.add_argument("--chunk-size", type=int, default=256, metavar="N", help="tokens per chunk at most (default: 256)")
    p.add_argument("--overlap", type=int, default=32, metavar="M", help="tokens shared by neighbouring chunks (default: 32)")
    p.add_argument("--embedder", default=MINILM, metavar="NAME",
                   help=f"{MINILM} (offline, from PyPI), a slmkit model directory, or an OpenAI-compatible URL "
                        f"(default: {MINILM})")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="pooling of a model embedder (default: mean)")
    p.add_argument("--embedder-model", metavar="NAME", help="model name at an embedder URL (default: the first it lists)")
    p.add_argument("--id-field", metavar="FIELD",
                   help="field of .jsonl/.csv records that is the document id (default: FILE:LINE)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata for every document read (repeat for several)")
    p.add_argument("--qdrant", metavar="URL_OR_DIR",
                   help="keep the vectors in a Qdrant collection: a server's URL, or a folder for Qdrant's local mode")
    p.add_argument("--collection", metavar="NAME", help="Qdrant collection (default: the index directory's name)")
    p.add_argument("--ann-threshold", type=int, default=DEFAULT_ANN_THRESHOLD, metavar="N",
                   help=f"search approximately (usearch HNSW) from N chunks on; 0: always (default: {DEFAULT_ANN_THRESHOLD})")
    p.add_argument("--force", action="store_true", help="replace INDEX (and the Qdrant collection) if it exists")
    reading_options(p)
    p.add_argument("--device", default="cpu", help="where the embedder runs (default: cpu)")
    p.set_defaults(handler=cmd_index)

    p = cmds.add_parser("add", parents=[common], help="add new or edited documents to an index",
                        description="Add documents; an edited one replaces its chunks, an unchanged one (same content "
                                    "hash) is skipped, and records no longer in a file read again are removed. One "
                                    "transaction: a crash leaves the index as it was.")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("paths", nargs="+", metavar="DOCS")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata for every document read")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="undecodable UTF-8 (default: strict)")
    p.add_argument("--skip-unreadable", action="store_true", help="skip files and folders that cannot be read")
    p.set_defaults(handler=cmd_add)

    p = cmds.add_parser("remove", parents=[common], help="remove documents from an index",
                        description="Remove documents by id, or every document read from a file or a folder.")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("targets", nargs="+", metavar="DOC_ID_OR_PATH")
    p.set_defaults(handler=cmd_remove)

    p = cmds.add_parser("query", parents=[common], help="search an index, or answer from it with --model",
                        description="Without --model: the best chunks. With --model: a grounded answer whose [n] "
                                    "citations map to chunks (document, source, character span).")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("question")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only documents whose metadata KEY is VALUE (repeat: one key's values are alternatives, keys "
                        "must all match; doc_id and source filter on a document's id and file)")
    _search_options(p)
    _answer_options(p, required=False)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_query)

    p = cmds.add_parser("serve", parents=[common], help="serve grounded answers over an OpenAI-compatible chat API",
                        description="POST /v1/chat/completions with model set to an index's name answers the last user "
                                    "message from that index; the completion carries citations and sources.")
    p.add_argument("indexes", nargs="+", metavar="[NAME=]INDEX", help="indexes to serve (name: the directory's by default)")
    _search_options(p)
    _answer_options(p, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--require-api-key", dest="api_key_required", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' from clients")
    p.set_defaults(handler=cmd_serve)

    p = cmds.add_parser("eval", parents=[common], help="measure retrieval (and answer) quality on a QA file",
                        description="Recall@1/5/10/20, MRR@10 and nDCG@10 at document level with 95% bootstrap intervals, "
                                    "on JSONL records {\"question\", \"doc_ids\": [...]}; with --model, exact match, "
                                    "token F1 and citation precision on records that have an \"answer\".")
    p.add_argument("index", metavar="INDEX")
    p.add_argument("qa", metavar="QA.jsonl")
    _search_options(p)
    p.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", metavar="MODEL_DIR_OR_URL", help="also answer and score the answers")
    p.add_argument("--served-model", metavar="NAME", help="model name at the URL")
    p.add_argument("--api-key", metavar="KEY", help="API key of the URL")
    p.add_argument("--context", type=int, metavar="N", help="context length of the model at the URL")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="answer length limit (default: 64)")
    device_options(p)
    p.set_defaults(handler=cmd_eval)
