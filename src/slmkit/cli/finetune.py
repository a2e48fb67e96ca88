"""`slmkit finetune classify|sft|dpo|distill` and `slmkit classify`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmkit.cli.common import device_options
from slmkit.config import parse_overrides

# flag -> FinetuneConfig key (defaults live in FinetuneConfig)
_TRAINING = ("max_steps", "max_minutes", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
             "clip", "precision", "activation_checkpointing", "strategy", "cpu_offload", "eval_every", "patience", "log_every", "save_every", "keep_checkpoints", "seed", "log_to",
             "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "qlora")


def _config(args: argparse.Namespace):
    """FinetuneConfig from the resumed run's saved settings, then --config, then the flags given."""
    from slmkit.finetune import FinetuneConfig
    from slmkit.train import load_recipe

    values: dict = {}
    saved = Path(args.out) / "finetune_config.json"
    if args.resume and saved.is_file():  # a resumed run keeps its settings
        values = json.loads(saved.read_text(encoding="utf-8"))
    if args.config:
        values.update(load_recipe(args.config))
    values.update({k: getattr(args, k) for k in _TRAINING if getattr(args, k, None) is not None})
    values.setdefault("lr", args.default_lr)
    for key in ("lora_targets", "log_to"):
        if isinstance(values.get(key), str):
            values[key] = [t.strip() for t in values[key].split(",") if t.strip()]
    return FinetuneConfig.from_dict(values)


def _run_options(args: argparse.Namespace) -> dict:
    return {"cfg": _config(args), "device": args.device, "force": args.force, "resume": args.resume, "progress": not args.quiet}


def _print_result(result) -> None:
    fit = result.fit
    print(f"{fit.steps} steps (best at {fit.best_step}{', stopped early' if fit.stopped_early else ''}); "
          f"trained {fit.trainable:,} of {fit.total:,} parameters ({fit.trainable / fit.total:.2%})")
    if result.skipped:
        print(f"skipped {result.skipped} bad records")
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    print("  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"wrote {result.run_dir}/final and {result.run_dir}/report.md")


def cmd_classify_train(args: argparse.Namespace) -> None:
    from slmkit.finetune import finetune_classify

    result = finetune_classify(
        args.model, args.train, args.out, text_field=args.text_field, label_field=args.label_field, val=args.val,
        test=args.test, val_fraction=args.val_fraction, test_fraction=args.test_fraction, fmt=args.format,
        header={"auto": None, "yes": True, "no": False}[args.header], pooling=args.pooling, train_layers=args.train_layers,
        class_weights=args.class_weights, max_length=args.max_length, skip_bad=args.skip_bad, **_run_options(args))
    _print_result(result)
    print(f"confusion matrix: {result.run_dir}/confusion.md")


def cmd_sft(args: argparse.Namespace) -> None:
    from slmkit.finetune import finetune_sft

    result = finetune_sft(
        args.model, args.data, args.out, template=args.template, val=args.val, val_fraction=args.val_fraction,
        fmt=args.format, train_on_prompt=args.train_on_prompt, pack=args.pack, max_length=args.max_length,
        max_new_tokens=args.max_new_tokens, max_responses=args.max_responses, skip_bad=args.skip_bad,
        **_run_options(args))
    _print_result(result)
    print(f"held-out responses: {result.run_dir}/responses.jsonl")


def cmd_dpo(args: argparse.Namespace) -> None:
    from slmkit.finetune import finetune_dpo

    result = finetune_dpo(
        args.model, args.data, args.out, beta=args.beta, template=args.template, val=args.val,
        val_fraction=args.val_fraction, fmt=args.format, precompute_ref=args.precompute_ref,
        max_length=args.max_length, skip_bad=args.skip_bad, **_run_options(args))
    _print_result(result)


def cmd_distill(args: argparse.Namespace) -> None:
    from slmkit.finetune import finetune_distill

    result = finetune_distill(
        args.teacher, args.data, args.out, student_dir=args.student, student_preset=args.student_preset,
        student_overrides=parse_overrides(args.set) if args.set else None, temperature=args.temperature,
        alpha=args.alpha, teacher_precision=args.teacher_precision, **_run_options(args))
    _print_result(result)


def cmd_classify(args: argparse.Namespace) -> None:
    from slmkit.model.classifier import load_classifier

    classifier = load_classifier(args.model, args.device, args.dtype)
    for text in args.texts:
        probs = classifier.predict_proba(text)
        label = max(probs, key=probs.get)
        print(json.dumps({"label": label, "probabilities": probs}) if args.json
              else f"{label} " + " ".join(f"{k}={v:.4f}" for k, v in probs.items()))


def _training_options(p: argparse.ArgumentParser, lr: float = 1e-4) -> None:
    g = p.add_argument_group("training (as for pretrain; runs unchanged under `torchrun --nproc_per_node=K`)")
    g.add_argument("--config", metavar="FILE", help="YAML or JSON recipe with the same keys as these flags; flags override it")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: 300)")
    g.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    g.add_argument("--batch-size", type=int, help="records per micro-step over all processes (default: 8)")
    g.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {lr:g})")
    p.set_defaults(default_lr=lr)
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: lr/10)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: min(10, 10%% of --max-steps))")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of weight matrices (default: 0)")
    g.add_argument("--clip", type=float, help="max global gradient norm, 0 to disable (default: 1.0)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: fp32 on CPU, bf16/fp16 on GPU")
    g.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp replicates the model on every process; fsdp shards parameters, gradients and "
                        "optimizer state (FSDP2) and writes sharded checkpoints (default: ddp)")
    g.add_argument("--cpu-offload", action="store_true", default=None,
                   help="with --strategy fsdp on GPUs: keep parameter shards and the optimizer step on the CPU")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in backward to save memory")
    g.add_argument("--eval-every", type=int, help="steps between validation runs; 0: only at the end (default: 50)")
    g.add_argument("--patience", type=int, help="early stop after N validations without improvement (default: 0, off)")
    g.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (default: 10)")
    g.add_argument("--log-to", metavar="TRACKERS", help="also send metrics to experiment trackers, comma-separated: "
                                                        "tensorboard, wandb, mlflow (each needs its package)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints, 0 for only the last (default: 0)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep (default: 3)")
    g.add_argument("--seed", type=int, help="seed of initialization, data order and splits (default: 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU; cuda:LOCAL_RANK under torchrun), cpu, "
                                                    "cuda, cuda:N or mps (default: auto); --precision sets the compute dtype")
    g.add_argument("--resume", action="store_true", help="continue --out from its newest complete checkpoint")
    g.add_argument("--force", action="store_true", help="delete --out if it exists and start over")
    g = p.add_argument_group("LoRA / QLoRA")
    g.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters instead of the weights (default: off)")
    g.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: updates are scaled by alpha/rank (default: 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default: 0)")
    g.add_argument("--lora-targets", metavar="LIST", help="comma-separated layers: q,k,v,o,gate,up,down or regexes (default: q,k,v,o)")
    g.add_argument("--qlora", action="store_true", default=None, help="LoRA over a frozen int8 copy of the base weights")


def _record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["csv", "tsv", "jsonl", "json"], help="record file format (default: from the file name)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records (and count them) instead of stopping")


def _instruction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (trained here or imported)")
    p.add_argument("--data", required=True, metavar="FILE", help="records: JSON list, JSONL, CSV or TSV")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: final/, metrics.jsonl, report.md")
    p.add_argument("--template", default="alpaca", metavar="alpaca|chatml|model|FILE.jinja",
                   help="chat template: a built-in one, the tokenizer's own (model), or a Jinja file; the tuned model "
                        "is chatted with, served and exported in it (default: alpaca)")
    p.add_argument("--val", metavar="FILE", help="validation records (default: a seeded --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data without --val (default: 0.1)")
    p.add_argument("--max-length", type=int, help="longest training sequence in tokens (default: the context length)")
    _record_options(p)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    finetune = commands.add_parser("finetune", help="specialize a model: classify, sft, dpo, distill",
                                   description="Fine-tune a model directory for a task; every command takes "
                                               "--lora-rank R to train LoRA adapters instead.")
    tasks = finetune.add_subparsers(dest="task", metavar="TASK", required=True)

    p = tasks.add_parser("classify", parents=[common], help="text classification with a new head",
                         description="Replace the LM head with a classification head and fine-tune on labelled "
                                     "records. Writes final/ (a classifier directory with labels.json), metrics.json, "
                                     "confusion.md and confusion.png.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (trained here or imported)")
    p.add_argument("--train", required=True, metavar="FILE", help="labelled records: CSV, TSV (header or not), JSONL")
    p.add_argument("--val", metavar="FILE", help="validation records (default: a seeded --val-fraction of --train)")
    p.add_argument("--test", metavar="FILE", help="test records for the final metrics")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--text-field", default="text", help="field or column (name, or number without a header) of the text")
    p.add_argument("--label-field", default="label", help="field or column of the label")
    p.add_argument("--header", choices=["auto", "yes", "no"], default="auto", help="CSV/TSV header row (default: auto)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --train without --val (default: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="seeded test split of --train without --test (default: 0)")
    p.add_argument("--pooling", choices=["last", "mean", "first"], default="last", help="token states -> one vector (default: last)")
    p.add_argument("--train-layers", default="all", metavar="head|last-N|all",
                   help="which layers train (default: all; with --lora-rank: the adapters and the head)")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="none", help="weight the loss against class imbalance")
    p.add_argument("--max-length", type=int, help="tokens per text (default: the context length)")
    _record_options(p)
    _training_options(p, lr=3e-4)
    p.set_defaults(handler=cmd_classify_train)

    p = tasks.add_parser("sft", parents=[common], help="instruction tuning on prompt/response records",
                         description="Supervised fine-tuning on Alpaca-style (instruction, input, output) or chat "
                                     "(messages) records, loss on response tokens only; writes responses.jsonl for "
                                     "the held-out records.")
    _instruction_options(p)
    p.add_argument("--train-on-prompt", action="store_true", help="take the loss on prompt tokens too")
    p.add_argument("--pack", action="store_true",
                   help="pack several examples into each context-length row (positions and attention stop at example "
                        "boundaries): fewer, fuller batches for short examples")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of held-out responses (default: 128)")
    p.add_argument("--max-responses", type=int, help="generate responses for at most N held-out records (default: all)")
    _training_options(p)
    p.set_defaults(handler=cmd_sft)

    p = tasks.add_parser("dpo", parents=[common], help="preference alignment with DPO",
                         description="Direct Preference Optimization on (prompt|instruction[+input], chosen, rejected) records.")
    _instruction_options(p)
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull toward the reference (default: 0.1)")
    p.add_argument("--precompute-ref", action="store_true", help="compute reference log-probs once instead of keeping a reference model")
    _training_options(p, lr=5e-5)
    p.set_defaults(handler=cmd_dpo)

    p = tasks.add_parser("distill", parents=[common], help="knowledge distillation from a teacher",
                         description="Train a student on token shards against the teacher's temperature-softened "
                                     "next-token distribution plus the data's cross-entropy.")
    p.add_argument("--teacher", required=True, metavar="MODEL_DIR", help="teacher model directory")
    p.add_argument("--student", metavar="MODEL_DIR", help="student model directory to continue")
    p.add_argument("--student-preset", metavar="NAME", help="a new student from a preset (with --set overrides)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a student config field (repeatable)")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards from `slmkit data prepare` (teacher's tokenizer)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--temperature", type=float, default=2.0, help="softening temperature T (default: 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher term; 1 - alpha weighs the data (default: 0.5)")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16"], default="fp32", help="teacher compute dtype (default: fp32)")
    _training_options(p, lr=6e-4)
    p.set_defaults(handler=cmd_distill)

    p = commands.add_parser("classify", parents=[common], help="label texts with a fine-tuned classifier",
                            description="Print the predicted label (first word) and the probability of every label.")
    p.add_argument("model", metavar="MODEL_DIR", help="classifier directory (final/ of `slmkit finetune classify`)")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text(s) to classify")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    device_options(p)
    p.set_defaults(handler=cmd_classify)
