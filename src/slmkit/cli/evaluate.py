"""`slmkit eval generate | text-metrics | judge` (added to the `eval` group of cli/generate.py)."""

from __future__ import annotations

import argparse
import json

from slmkit.cli.common import device_options


def cmd_generate(args: argparse.Namespace) -> None:
    from slmkit.eval.responses import eval_generate

    rows = eval_generate(args.model, args.data, args.out, template=args.template, adapter=args.adapter,
                         max_new_tokens=args.max_new_tokens, limit=args.limit, fmt=args.format,
                         skip_bad=args.skip_bad, device=args.device, dtype=args.dtype, progress=not args.quiet)
    print(f"wrote {len(rows)} responses to {args.out}")


def cmd_text_metrics(args: argparse.Namespace) -> None:
    from slmkit.eval.text_metrics import read_responses, text_metrics

    scores = text_metrics(read_responses(args.responses), strict=True)
    print(json.dumps(scores, indent=2) if args.json else "\n".join(f"{k:>16}: {v:.4f}" for k, v in scores.items()))


def cmd_judge(args: argparse.Namespace) -> None:
    from slmkit.eval.judge import judge
    from slmkit.eval.text_metrics import read_responses

    rows = read_responses(args.responses)[: args.limit]
    result = judge(rows, args.judge_url, args.judge_model, api_key=args.api_key, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"mean score {result.mean:.1f} over {len(result.valid)} of {len(result.scores)} responses")
    for bucket, count in result.distribution().items():
        print(f"{bucket:>7} {'#' * count} {count}")


def register_eval(eval_cmds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = eval_cmds.add_parser("generate", parents=[common], help="generate responses for instruction records",
                             description="Greedy responses of MODEL_DIR for instruction records, written as JSONL "
                                         "(instruction, input, reference, response) for text-metrics and judge.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--data", required=True, metavar="FILE", help="instruction or chat records")
    p.add_argument("--out", default="responses.jsonl", metavar="FILE", help="output JSONL (default: responses.jsonl)")
    p.add_argument("--template", metavar="alpaca|chatml|model|FILE.jinja",
                   help="chat template (default: the one the model was tuned with)")
    p.add_argument("--adapter", metavar="NAME", help="apply MODEL_DIR/adapters/NAME (default: the one in generation.json, if any)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest response (default: 128)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl", "json"], help="record file format (default: from the name)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records instead of stopping")
    device_options(p)
    p.set_defaults(handler=cmd_generate)

    p = eval_cmds.add_parser("text-metrics", parents=[common], help="exact match, token F1, ROUGE-L, BLEU",
                             description="Compare each response with its reference: exact match and token F1 on "
                                         "normalized text, ROUGE-L (rouge-score), corpus BLEU (sacrebleu).")
    p.add_argument("responses", metavar="RESPONSES", help="responses.jsonl")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_text_metrics)

    p = eval_cmds.add_parser("judge", parents=[common], help="LLM-as-judge through an OpenAI-compatible API",
                             description="Score every response 0-100 with a judge model behind any OpenAI-compatible "
                                         "endpoint; print the mean and the distribution.")
    p.add_argument("responses", metavar="RESPONSES", help="responses.jsonl")
    p.add_argument("--judge-url", required=True, metavar="URL", help="base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", required=True, metavar="NAME", help="model name the endpoint serves")
    p.add_argument("--api-key", default="not-needed", help="API key, if the endpoint needs one")
    p.add_argument("--limit", type=int, help="only the first N responses")
    p.add_argument("--json", action="store_true", help="print every score as JSON")
    p.set_defaults(handler=cmd_judge)
