"""`slmkit generate`, `slmkit chat` and `slmkit eval perplexity`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slmkit.cli.common import device_options
from slmkit.cli.evaluate import register_eval
from slmkit.errors import InputError


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line options over the model's generation.json over the library defaults."""
    from slmkit.model.io import generation_defaults

    defaults = generation_defaults(args.model)
    names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "seed")
    settings = {name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name) for name in names}
    settings = {name: value for name, value in settings.items() if value is not None}
    settings["stop_tokens"] = defaults.get("stop_tokens")
    return settings


def _load_for_generation(args: argparse.Namespace):
    """The model on the chosen backend: PyTorch (optionally offloaded) or ONNX Runtime."""
    if args.backend == "onnx":
        if args.offload:
            raise InputError("--offload streams PyTorch weights; it does not apply to --backend onnx")
        if args.device not in ("auto", "cpu") or args.dtype not in ("auto", "float32"):
            raise InputError("--backend onnx runs the exported float32 graph on ONNX Runtime's CPU provider; "
                             "drop --device and --dtype")
        from slmkit.generation.ort import load_onnx

        return load_onnx(args.model, args.ort_opt_level, args.save_optimized, args.profile)
    if args.profile or args.save_optimized or args.ort_opt_level != "all":
        raise InputError("--profile, --save-optimized and --ort-opt-level are ONNX Runtime options; add --backend onnx")
    if args.offload:
        from slmkit.devices import resolve_device
        from slmkit.generation.offload import load_offloaded

        if args.dtype not in ("auto", "float32"):
            raise InputError("--offload streams the stored float32 weights; drop --dtype")
        return load_offloaded(args.model, args.offload, resolve_device(args.device))
    from slmkit.model.io import load

    return load(args.model, args.device, args.dtype)


def _report_run(args: argparse.Namespace, model) -> None:
    """Profile and memory reports go to stderr, so stdout stays the generated text."""
    if args.profile:
        from slmkit.generation.ort import top_operators

        trace = model.end_profiling()
        print(f"ONNX Runtime trace: {trace}\ntop operators by time:", file=sys.stderr)
        for op, ms, calls in top_operators(trace):
            print(f"  {op:<24} {ms:10.2f} ms  {calls:6d} calls", file=sys.stderr)
    if args.offload:
        from slmkit.generation.offload import offload_stats

        print(offload_stats(model).summary(), file=sys.stderr)


def _chat_session(args: argparse.Namespace, model, tokenizer):
    """A chat in the model's own chat format, with the command line's sampling settings."""
    from slmkit.chat import ChatFormat
    from slmkit.generation.chat import ChatSession
    from slmkit.generation.sampling import SamplingParams

    settings = _settings(args)
    settings.pop("stop_tokens")  # the chat format decides what ends a reply
    max_new_tokens, seed = settings.pop("max_new_tokens", 256), settings.pop("seed", None)
    return ChatSession(model, tokenizer, max_new_tokens, SamplingParams(**settings), seed,
                       ChatFormat.for_model(args.model, tokenizer))


def cmd_generate(args: argparse.Namespace) -> None:
    from slmkit.generation import generate, stream

    if args.stream and args.num_beams > 1:
        raise InputError("--stream works with greedy decoding and sampling, not with beam search (--num-beams)")
    if args.chat and (args.num_beams > 1 or args.stop):
        raise InputError("--chat answers in the model's chat format, which decides where the reply ends; "
                         "drop --num-beams and --stop")
    model, tokenizer = _load_for_generation(args)
    settings = _settings(args)
    if args.chat:
        for delta in _chat_session(args, model, tokenizer).send(args.prompt):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    elif args.stream:
        for delta in stream(model, tokenizer, args.prompt, stop=args.stop, **settings):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate(model, tokenizer, args.prompt, stop=args.stop, num_beams=args.num_beams, **settings))
    _report_run(args, model)


def cmd_chat(args: argparse.Namespace) -> None:
    from slmkit.generation.chat import repl
    from slmkit.model.io import load

    model, tokenizer = load(args.model, args.device, args.dtype)
    repl(_chat_session(args, model, tokenizer), sys.stdin, sys.stdout)


def cmd_eval_perplexity(args: argparse.Namespace) -> None:
    from slmkit.eval import perplexity
    from slmkit.model.io import load

    model, tokenizer = load(args.model, args.device, args.dtype)
    result = perplexity(model, tokenizer, args.paths, args.context, args.stride, args.batch_size, args.text_field,
                        progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("--max-new-tokens", metavar="N", type=int, help="most tokens to generate (default: generation.json, else 50)")
    p.add_argument("--temperature", metavar="T", type=float, help="0 is greedy (default: generation.json, else 0)")
    p.add_argument("--top-k", metavar="K", type=int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", metavar="P", type=float, help="sample only from the smallest set of tokens whose probability reaches p")
    p.add_argument("--min-p", metavar="P", type=float, help="drop tokens less likely than min-p times the most likely one")
    p.add_argument("--repetition-penalty", metavar="X", type=float, help="> 1 discourages tokens already in prompt or output")
    p.add_argument("--frequency-penalty", metavar="X", type=float, help="subtracted from a token's logit per occurrence in the output")
    p.add_argument("--presence-penalty", metavar="X", type=float, help="subtracted from a token's logit once it occurs in the output")
    p.add_argument("--seed", metavar="N", type=int, help="seed of the sampler, for reproducible output")
    device_options(p)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("generate", parents=[common], help="continue a prompt with a model",
                            description="Generate a continuation of PROMPT (printed without the prompt). Settings not "
                                        "given come from the model's generation.json.")
    _sampling_options(p)
    p.add_argument("prompt", metavar="PROMPT", help="text to continue")
    p.add_argument("--num-beams", metavar="N", type=int, default=1,
                   help="beam search with N beams, length-normalized (ignores the sampling options; default: 1)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="end the output before this string (repeat for several)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--chat", action="store_true",
                   help="PROMPT is a user message: answer it in the model's chat format (as `slmkit chat` does), "
                        "streamed, ending where the format ends a reply")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: a model directory in PyTorch; onnx: an `slmkit export onnx` directory on ONNX Runtime")
    p.add_argument("--offload", choices=["cpu", "disk"],
                   help="keep the layers in CPU memory or on disk (memory-mapped) and stream them to the device one at "
                        "a time, for models larger than the device's memory; prints the memory high-water mark")
    p.add_argument("--ort-opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                   help="ONNX Runtime graph optimization level (default: all)")
    p.add_argument("--save-optimized", metavar="FILE.onnx", help="write the graph ONNX Runtime optimized to this file")
    p.add_argument("--profile", action="store_true",
                   help="write ONNX Runtime's JSON trace into the export directory and print the top operators by time")
    p.set_defaults(handler=cmd_generate)

    p = commands.add_parser("chat", parents=[common], help="chat with a model in the terminal",
                            description="Interactive chat on stdin, in the model's chat template (the one it was tuned with), "
                                        "else ChatML when the tokenizer has its tokens, else 'User: ... Assistant:' text. /reset clears the history, /exit or EOF quits. "
                                        "The oldest turns are dropped when the history outgrows the context.")
    _sampling_options(p)
    p.set_defaults(handler=cmd_chat)

    evaluate = commands.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    eval_cmds = evaluate.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    p = eval_cmds.add_parser("perplexity", parents=[common], help="perplexity and bits-per-byte on text files",
                             description="Score every token of the documents once, with sliding windows over long "
                                         "ones; print tokens, mean NLL, perplexity and bits-per-byte.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("paths", nargs="+", metavar="PATH", help="text files or directories")
    p.add_argument("--context", metavar="N", type=int, help="window length in tokens (default: the model's context)")
    p.add_argument("--stride", metavar="N", type=int, help="tokens between window ends; < context gives more context per token (default: context / 2)")
    p.add_argument("--batch-size", metavar="N", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .csv files (default: text)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    device_options(p)
    p.set_defaults(handler=cmd_eval_perplexity)
    register_eval(eval_cmds, common)
