"""`slmkit pretrain`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slmkit.config import parse_overrides

# flag -> TrainConfig key, for the flags that map one to one (defaults live in TrainConfig)
_FLAGS = (
    "data", "out", "preset", "tokenizer", "init", "seq_len", "max_steps", "max_minutes", "batch_size", "grad_accum",
    "lr", "min_lr", "warmup_steps", "weight_decay", "clip", "precision", "compile", "activation_checkpointing", "strategy",
    "cpu_offload",
    "eval_every", "eval_batches", "save_every", "keep_checkpoints", "log_every", "seed", "peak_flops", "log_to",
)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from slmkit.train import TrainConfig, load_recipe, pretrain

    values: dict = {}
    saved = Path(getattr(args, "out", "")) / "train_config.json"
    if args.resume and hasattr(args, "out") and saved.is_file():  # a resumed run keeps its settings
        values = json.loads(saved.read_text(encoding="utf-8"))
    if args.recipe:
        values.update(load_recipe(args.recipe))
    values.update({key: getattr(args, key) for key in _FLAGS if hasattr(args, key)})
    if args.set:
        values["model"] = {**values.get("model", {}), **parse_overrides(args.set)}
    result = pretrain(TrainConfig.from_dict(values), resume=args.resume, force=args.force, progress=not args.quiet)
    print(f"{result.steps} steps, {result.tokens:,} tokens: train loss {result.train_loss:.4f}, "
          f"val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f}), {result.tokens_per_s:,.0f} tok/s, MFU {result.mfu:.1%}")
    print(f"wrote {result.run_dir}/final and {result.run_dir}/report.md")


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "pretrain", parents=[common], help="pretrain a model on token shards",
        description="Pretrain a model from a preset (or continue one with --init) on token shards from `slmkit data prepare`. "
                    "Runs unchanged under `torchrun --nproc_per_node=K` (--strategy ddp or fsdp). Settings come from TrainConfig defaults, "
                    "then --recipe, then flags.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the recipe
    )
    p.add_argument("--data", metavar="DIR", help="token shards directory from `slmkit data prepare`")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory: checkpoints/, final/, metrics.jsonl, report.md")
    p.add_argument("--recipe", "--config", dest="recipe", metavar="FILE", default=None,
                   help="YAML or JSON file with the same keys as the flags")
    p.add_argument("--preset", help="model preset (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model config field (repeatable)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer the data was prepared with (default: the --init model's, else the copy in DATA)")
    p.add_argument("--init", metavar="MODEL_DIR", help="continue pretraining this model directory")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="tokens per training window (default: the model's context); shorter windows make each step "
                        "cheaper, e.g. to continue a model with an 8192-token context on a CPU")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: 1000); the LR schedule ends here")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--batch-size", type=int, help="windows per micro-step over all processes (default: 8)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 6e-4)")
    p.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default: lr/10)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: min(100, 10%% of --max-steps))")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay of weight matrices (default: 0.1)")
    p.add_argument("--clip", type=float, help="max global gradient norm, 0 to disable (default: 1.0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: fp32 on CPU, bf16/fp16 on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager on failure)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="under torchrun: ddp replicates the model on every process; fsdp shards parameters, gradients and "
                        "optimizer state (FSDP2) and writes sharded checkpoints (default: ddp)")
    p.add_argument("--cpu-offload", action="store_true", help="with --strategy fsdp on GPUs: keep parameter shards and the optimizer step on the CPU")
    p.add_argument("--eval-every", type=int, help="steps between validation runs, 0 for none (default: 200)")
    p.add_argument("--eval-batches", type=int, help="batches per validation run (default: 20)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints, 0 for only the last (default: 500)")
    p.add_argument("--keep-checkpoints", type=int, help="checkpoints to keep (default: 3)")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (default: 10)")
    p.add_argument("--seed", type=int, help="seed of initialization, data order and masking (default: 0)")
    p.add_argument("--log-to", type=lambda s: [n for n in s.split(",") if n], metavar="TRACKERS",
                   help="also send metrics to experiment trackers, comma-separated: tensorboard, wandb, mlflow "
                        "(each needs its package: pip install 'slmkit[tensorboard]')")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU (default: measured with a matmul)")
    p.add_argument("--resume", action="store_true", default=False, help="continue --out from its newest complete checkpoint")
    p.add_argument("--force", action="store_true", default=False, help="delete --out if it exists and start over")
    p.set_defaults(handler=cmd_pretrain)
