"""`slmkit serve` and `slmkit bench serve`."""

from __future__ import annotations

import argparse
import json

from slmkit.cli.common import device_options
from slmkit.errors import InputError


def _adapters(pairs: list[str]) -> dict[str, str]:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter takes NAME=PATH, not {pair!r}")
        adapters[name] = path
    return adapters


def cmd_serve(args: argparse.Namespace) -> None:
    from slmkit.serve import serve

    serve(args.model, args.host, args.port, api_key=args.api_key, adapters=_adapters(args.adapter),
          max_batch_tokens=args.max_batch_tokens, max_seqs=args.max_seqs, max_queue=args.max_queue,
          kv_blocks=args.kv_blocks, kv_memory=args.kv_memory, max_context=args.max_context, block_size=args.block_size,
          prefix_caching=not args.no_prefix_caching,
          draft_model=args.draft_model, draft_layers=args.draft_layers, draft_mtp=args.draft_mtp, num_draft=args.num_draft,
          model_name=args.model_name, device=args.device, dtype=args.dtype)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from slmkit.serve.bench import bench_serve

    result = bench_serve(args.url, args.concurrency, args.requests, args.prompt_len, args.max_tokens,
                         args.request_rate, args.model, args.api_key, args.vocab_size, args.seed,
                         prompt_kind=args.prompt_kind)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "serve", parents=[common], help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR at /v1/models, /v1/completions, /v1/chat/completions (streaming with "
                    "stream: true), /v1/embeddings, /tokenize, /detokenize, /health and /metrics (Prometheus), "
                    "with continuous batching over a paged KV cache. Adapters under MODEL_DIR/adapters/ are served by name. SIGTERM or Ctrl-C stops "
                    "accepting requests, lets running ones finish (up to 30 s) and exits 0.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter as model NAME (repeat for several)")
    p.add_argument("--model-name", metavar="NAME", help="the name clients use for the base model (default: the directory name)")
    p.add_argument("--max-batch-tokens", metavar="N", type=int, default=512,
                   help="tokens per forward pass, prefill chunks and decodes together (default: 512)")
    p.add_argument("--max-seqs", metavar="N", type=int, default=64, help="sequences in the running batch (default: 64)")
    p.add_argument("--max-queue", metavar="N", type=int, default=256,
                   help="requests allowed to wait beyond the running batch; more get 429 (default: 256)")
    p.add_argument("--kv-memory", metavar="SIZE",
                   help="memory for the KV cache: a fraction of what is available once the model is loaded (0.5, "
                        "50%%) or an amount (4GB, 512MB; a bare number above 1 is GB) (default: 0.25 of the RAM "
                        "available on CPU, 0.8 of the free memory on CUDA, at most --max-seqs full-context sequences)")
    p.add_argument("--kv-blocks", metavar="N", type=int,
                   help="KV-cache blocks to preallocate, instead of sizing the cache from memory")
    p.add_argument("--max-context", metavar="N", type=int,
                   help="longest sequence served, prompt and output, in tokens (default: the model's context, at "
                        "most what the KV cache holds)")
    p.add_argument("--block-size", metavar="N", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV blocks of shared prompt prefixes")
    p.add_argument("--draft-model", metavar="DIR", help="speculative decoding with this smaller model (same tokenizer)")
    p.add_argument("--draft-layers", metavar="N", type=int,
                   help="speculative decoding with the model's own first N layers as the draft (early exit)")
    p.add_argument("--draft-mtp", action="store_true",
                   help="speculative decoding with the model's own multi-token-prediction modules (models with "
                        "mtp_depth >= 1; drafts at most mtp_depth tokens per step)")
    p.add_argument("--num-draft", metavar="K", type=int, default=4, help="tokens drafted per step (default: 4)")
    device_options(p)
    p.set_defaults(handler=cmd_serve)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_cmds = bench.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = bench_cmds.add_parser(
        "serve", parents=[common], help="load-test a running server",
        description="Send streaming completions of random prompts to an OpenAI-compatible server (slmkit's, "
                    "llama-cpp-python's, vLLM, ...) and report TTFT, TPOT, ITL and E2EL (mean/p50/p95/p99), request "
                    "and token throughput, with vLLM's definitions, and the reasons of failed requests.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: http://127.0.0.1:8000)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default: 32)")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default: 200)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default: 32)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", metavar="KEY", help="API key of the server")
    p.add_argument("--prompt-kind", choices=("auto", "ids", "text"), default="auto",
                   help="prompts as random token ids or as random words (about one token each); auto: ids for a "
                        "slmkit server, text for others (default: auto)")
    p.add_argument("--vocab-size", type=int, help="draw prompt ids below this (default: 256, the byte tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--output", metavar="PATH", help="also write the JSON result to PATH")
    p.set_defaults(handler=cmd_bench_serve)
