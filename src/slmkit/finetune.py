"""Specialize a model: classification, instruction tuning (SFT), preference alignment (DPO) and
knowledge distillation, each with full fine-tuning or LoRA/QLoRA (`FinetuneConfig.lora_rank`).

    from slmkit.finetune import FinetuneConfig, finetune_classify
    result = finetune_classify("runs/tiny/final", "sms.tsv", out="runs/spam", text_field="1", label_field="0",
                               cfg=FinetuneConfig(max_steps=300, lr=3e-4))
    print(result.metrics["accuracy"])

Every task trains in the one training loop (`slmkit.train.loop`), so each has gradient
accumulation, fp16 loss scaling, the model's MoE/MTP losses, DDP or FSDP (`cfg.strategy`) under
`torchrun`, trackers, checkpoints and `resume=True`. A run directory holds metrics.jsonl, report.md (+ loss.png),
finetune_config.json, `checkpoints/step-N/`, and `final/`: a model directory (for
classification, a classifier directory) — with LoRA, the unchanged base model files plus
`adapters/default/`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit._io import atomic_dir, write_json
from slmkit.chat import ChatFormat
from slmkit.data.records import read_records, split_records
from slmkit.devices import resolve_device
from slmkit.errors import InputError
from slmkit.model.classifier import SequenceClassifier, save_classifier
from slmkit.model.io import load_model, save_model_dir
from slmkit.model.lora import inject_lora, save_adapter
from slmkit.quant.methods import quantize_int8
from slmkit.tokenizer import Tokenizer
from slmkit.train import checkpoint as ckpt
from slmkit.train import parallel
from slmkit.train.distributed import Dist
from slmkit.train.distributed import setup as setup_distributed
from slmkit.train.loop import FitResult, Loop, check_resume
from slmkit.train.objectives.classify import (
    Classification,
    ClassificationExample,
    balanced_class_weights,
    classification_metrics,
)
from slmkit.train.recipe import FinetuneConfig
from slmkit.train.report import plot_losses, write_report
from slmkit.train.sources import ShuffledEpochs

ADAPTER = "default"


@dataclass
class FinetuneResult:
    run_dir: Path
    fit: FitResult
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics (test set when there is one)
    skipped: int = 0  # bad records skipped with skip_bad

    @property
    def trainable_fraction(self) -> float:
        return self.fit.trainable / self.fit.total


def apply_lora(backbone: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Freeze `backbone` (int8 under QLoRA) and add the `default` adapter; [] without LoRA."""
    if not cfg.lora_rank:
        return []
    if cfg.qlora:
        quantize_int8(backbone)
    return inject_lora(backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)


def _device(device: str | None, dist: Dist) -> torch.device:
    """--device; auto under torchrun is this process's device (cuda:LOCAL_RANK), else as `resolve_device`."""
    if dist.enabled and device in (None, "auto"):
        return dist.device
    return resolve_device(device)


def _fit(model: nn.Module, objective, train: Sequence[Any], val: Sequence[Any], cfg: FinetuneConfig, out: Path,
         save: Callable[[Path], Any], dist: Dist, *, resume: bool, force: bool, progress: bool) -> FitResult:
    """Run the training loop on prepared examples in run directory `out` (continuing its newest
    checkpoint with `resume`); afterwards the model holds the best evaluation's weights."""
    if not len(train):
        raise InputError("no training examples")
    parallel.check(cfg, dist)
    ckpt.check_run_dir(out, resume, force)
    dist.barrier()
    latest = ckpt.latest_checkpoint(out) if resume else None
    state = ckpt.load_state(latest) if latest else None
    if state is not None:
        check_resume(model, state, cfg.strategy)
    if dist.main:
        ckpt.prepare_run_dir(out, force and not resume, "finetune_config.json", cfg.to_dict())
    dist.barrier()
    loop = Loop(model, objective, ShuffledEpochs(train, cfg.seed), val, cfg, out, save, state=state, dist=dist,
                weights_in_state=True, restore_best=True, patience=cfg.patience, progress=progress)
    return loop.fit()


def _save_final(out: Path, save: Callable[[Path], Any]) -> None:
    with atomic_dir(out / "final", force=True) as final:
        save(final)


def _done(dist: Dist) -> None:
    dist.barrier()
    dist.close()


def _prepare_each(objective, records: Sequence[dict[str, Any]], skip_bad: bool) -> tuple[list[Any], int]:
    """objective.prepare record by record, so one bad record is reported (or skipped) alone."""
    out, skipped = [], 0
    for record in records:
        try:
            out += objective.prepare([record])
        except InputError as e:
            if not skip_bad:
                message = str(e)
                where = record.get("_source")
                raise InputError(message if not where or message.startswith(where) else f"{where}: {message}") from None
            skipped += 1
    return out, skipped


def _finish(tmp: Path, cfg: FinetuneConfig, result: FitResult, summary: dict[str, Any], model_cfg: dict[str, Any], title: str) -> None:
    """loss.png and report.md in run directory `tmp`."""
    from slmkit.train.run_metrics import read_metrics

    plotted = plot_losses(read_metrics(tmp / "metrics.jsonl"), tmp / "loss.png")
    summary = {
        "trainable parameters": result.trainable,
        "total parameters": result.total,
        "trainable fraction": result.trainable / result.total,
        "steps": result.steps,
        "warmup steps": f"{cfg.warmup}" + (" (derived from the run length)" if cfg.warmup_steps is None else ""),
        "best step": result.best_step,
        "stopped early": str(result.stopped_early),
        "step time (s, median)": result.step_seconds,
        "peak memory of rank 0 (MB)": result.peak_memory_mb,
        "strategy": cfg.strategy,
        **summary,
    }
    write_report(tmp / "report.md", summary, cfg.to_dict(), model_cfg, plotted, title=title)


def _save_lm(model, tokenizer: Tokenizer, base_dir: Path, target: Path, lora: bool, generation: dict[str, Any],
             chat_format: ChatFormat | None = None) -> None:
    """final/: the trained model directory, or (LoRA) the base model's files + adapters/default;
    with the chat template it was tuned in and that template's stop tokens."""
    if lora:
        target.mkdir(parents=True, exist_ok=True)
        for f in base_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, target / f.name)
        save_adapter(model, target / "adapters" / ADAPTER, ADAPTER, base_model=str(base_dir))
        gen_path = target / "generation.json"
        defaults = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        write_json(gen_path, {**defaults, **generation, "adapter": ADAPTER})  # what `eval generate` applies
    else:
        save_model_dir(model, target, tokenizer, generation)
    if chat_format is not None:
        chat_format.save(target)


# ---------------------------------------------------------------------- classification
def finetune_classify(
    model_dir: str | os.PathLike,
    train: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    label_field: str = "label",
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    fmt: str | None = None,
    header: bool | None = None,
    pooling: str = "last",
    train_layers: str = "all",
    class_weights: str = "none",
    max_length: int | None = None,
    skip_bad: bool = False,
    cfg: FinetuneConfig | None = None,
    device: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Replace the LM head with a classification head and fine-tune on labelled text.

    Without `val`, a seeded `val_fraction` of the training records validates; without `test`,
    `test_fraction` > 0 holds out a seeded test split first. Early stopping watches validation
    accuracy; the final metrics are on the test set when there is one, else on validation.
    """
    cfg = cfg or FinetuneConfig()
    if class_weights not in ("none", "balanced"):
        raise InputError(f"class weights must be none or balanced, not {class_weights!r}")
    model_dir = Path(model_dir)
    fields_ = (text_field, label_field)
    train_records = read_records(train, fields_, fmt=fmt, header=header, skip_bad=skip_bad)
    skipped = train_records.skipped
    items = train_records.items
    if test is None and test_fraction:
        items, test_items = split_records(items, test_fraction, cfg.seed)
    else:
        test_items = _read_optional(test, fields_, fmt, header, skip_bad)
    if val is None:
        items, val_items = split_records(items, val_fraction, cfg.seed + 1)
    else:
        val_items = _read_optional(val, fields_, fmt, header, skip_bad)
    labels = sorted({r[label_field] for r in items})
    index = {name: i for i, name in enumerate(labels)}

    def examples(records: list[dict[str, Any]]) -> list[ClassificationExample]:
        out_ = []
        for r in records:
            if r[label_field] not in index:
                raise InputError(f"{r['_source']}: label {r[label_field]!r} does not occur in the training data ({', '.join(labels)})")
            out_.append(ClassificationExample(r[text_field], index[r[label_field]]))
        return out_

    train_ex, val_ex, test_ex = examples(items), examples(val_items), examples(test_items)
    dist = setup_distributed()
    dev = _device(device, dist)
    tokenizer = Tokenizer.load(model_dir)
    torch.manual_seed(cfg.seed)
    backbone = load_model(model_dir, dtype="float32").train()
    model = SequenceClassifier(backbone, labels, pooling)
    lora = apply_lora(backbone, cfg)
    model.freeze("head" if lora else train_layers)
    for name, p in backbone.named_parameters():  # with LoRA, the adapters train with the head
        p.requires_grad = p.requires_grad or ".lora_" in name
    model.to(dev)
    weights = balanced_class_weights([e.label for e in train_ex], len(labels)) if class_weights == "balanced" else None
    objective = Classification(tokenizer, labels, max_length or backbone.cfg.context_length, weights)

    def save(target: Path) -> None:
        save_classifier(model, target, tokenizer, adapter=ADAPTER if lora else None, backbone_dir=model_dir if lora else None)
        if lora:
            save_adapter(backbone, target / "adapters" / ADAPTER, ADAPTER, base_model=str(model_dir))

    out = Path(out)
    result = _fit(model, objective, train_ex, val_ex, cfg, out, save, dist, resume=resume, force=force, progress=progress)
    final_ex = test_ex or val_ex
    metrics = classification_metrics([e.label for e in final_ex], objective.predict(model, final_ex), labels) if final_ex else {}
    split = "test" if test_ex else "validation"
    if dist.main:
        if metrics:
            write_json(out / "metrics.json", {"split": split, **metrics})
            (out / "confusion.md").write_text(confusion_markdown(metrics, labels, split), encoding="utf-8")
            plot_confusion(metrics["confusion"], labels, out / "confusion.png")
        _save_final(out, save)
        summary = {f"{split} {k}": v for k, v in metrics.items() if isinstance(v, float)}
        _finish(out, cfg, result, {"labels": ", ".join(labels), "skipped records": skipped, **summary},
                backbone.cfg.to_dict(), "Classification fine-tuning report")
    _done(dist)
    return FinetuneResult(out, result, metrics, skipped)


def _read_optional(path, fields_, fmt, header, skip_bad) -> list[dict[str, Any]]:
    return read_records(path, fields_, fmt=fmt, header=header, skip_bad=skip_bad).items if path else []


def confusion_markdown(metrics: dict[str, Any], labels: Sequence[str], split: str) -> str:
    lines = [f"# Classification results ({split})", "",
             f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}", "",
             "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in metrics["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, metrics["confusion"]):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


def plot_confusion(matrix: list[list[int]], labels: Sequence[str], out: Path) -> bool:
    """The confusion matrix as a PNG heat map; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------- instruction tuning
def _instruction_data(data, fmt, skip_bad, val, val_fraction, seed) -> tuple[list, list, int]:
    records = read_records(data, fmt=fmt, skip_bad=skip_bad)
    if val:
        return records.items, read_records(val, fmt=fmt, skip_bad=skip_bad).items, records.skipped
    train, held = split_records(records.items, val_fraction, seed)
    return train, held, records.skipped


def finetune_sft(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    template: str = "alpaca",
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    fmt: str | None = None,
    train_on_prompt: bool = False,
    pack: bool = False,
    max_length: int | None = None,
    max_new_tokens: int = 128,
    max_responses: int | None = None,
    skip_bad: bool = False,
    cfg: FinetuneConfig | None = None,
    device: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Instruction-tune on Alpaca-style or chat records; loss on response tokens only (unless
    `train_on_prompt`); `pack` lays several examples end to end in each context-length row.
    Afterwards the held-out records' responses go to responses.jsonl."""
    from slmkit.eval.responses import generate_responses, write_jsonl
    from slmkit.eval.text_metrics import text_metrics
    from slmkit.train.objectives.sft import SupervisedFineTuning

    cfg = cfg or FinetuneConfig()
    model_dir = Path(model_dir)
    train_records, val_records, skipped = _instruction_data(data, fmt, skip_bad, val, val_fraction, cfg.seed)
    tokenizer = Tokenizer.load(model_dir)
    fmt_ = ChatFormat.from_name(template, tokenizer, model_dir)
    torch.manual_seed(cfg.seed)
    model = load_model(model_dir, dtype="float32").train()
    objective = SupervisedFineTuning(fmt_, max_length or model.cfg.context_length, _pad_id(tokenizer), train_on_prompt,
                                     pack=pack)
    train_ex, bad_train = _prepare_each(objective, train_records, skip_bad)
    val_ex, bad_val = _prepare_each(objective, val_records, skip_bad)
    lora = apply_lora(model, cfg)
    dist = setup_distributed()
    model.to(_device(device, dist))

    def save(target: Path) -> None:
        _save_lm(model, tokenizer, model_dir, target, bool(lora), {}, fmt_)

    out = Path(out)
    result = _fit(model, objective, train_ex, val_ex, cfg, out, save, dist, resume=resume, force=force, progress=progress)
    scores = {}
    if dist.main:
        held = val_records[:max_responses] if max_responses else val_records
        responses = generate_responses(model, fmt_, held, max_new_tokens, progress=progress)
        write_jsonl(out / "responses.jsonl", responses)
        scores = text_metrics(responses)
        _save_final(out, save)
        _finish(out, cfg, result, {"template": template, "skipped records": skipped + bad_train + bad_val,
                                   "best val loss": result.best.get("loss", float("nan")), **scores},
                model.cfg.to_dict(), "Instruction tuning report")
    _done(dist)
    return FinetuneResult(out, result, {**result.best, **scores}, skipped + bad_train + bad_val)


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


# ---------------------------------------------------------------------- preference alignment
def finetune_dpo(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    beta: float = 0.1,
    template: str = "alpaca",
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    fmt: str | None = None,
    precompute_ref: bool = False,
    max_length: int | None = None,
    skip_bad: bool = False,
    cfg: FinetuneConfig | None = None,
    device: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Align to preference records (prompt or instruction[+input], chosen, rejected) with DPO.

    The reference is the starting model: a frozen copy, the base under LoRA (adapters switched
    off, no copy), or log-probs computed once up front with `precompute_ref`."""
    from slmkit.train.objectives.dpo import DirectPreference

    cfg = cfg or FinetuneConfig()
    model_dir = Path(model_dir)
    train_records, val_records, skipped = _instruction_data(data, fmt, skip_bad, val, val_fraction, cfg.seed)
    tokenizer = Tokenizer.load(model_dir)
    fmt_ = ChatFormat.from_name(template, tokenizer, model_dir)
    dist = setup_distributed()
    dev = _device(device, dist)
    model = load_model(model_dir, dtype="float32").to(dev).train()
    objective = DirectPreference(fmt_, max_length or model.cfg.context_length, _pad_id(tokenizer), beta)
    train_ex, bad_train = _prepare_each(objective, train_records, skip_bad)
    val_ex, bad_val = _prepare_each(objective, val_records, skip_bad)
    lora = apply_lora(model, cfg)
    if precompute_ref:
        objective.precompute_reference(model, train_ex)
        objective.precompute_reference(model, val_ex)
    elif not lora:
        objective.reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()

    def save(target: Path) -> None:
        _save_lm(model, tokenizer, model_dir, target, bool(lora), {}, fmt_)

    out = Path(out)
    result = _fit(model, objective, train_ex, val_ex, cfg, out, save, dist, resume=resume, force=force, progress=progress)
    start = {k: v for k, v in result.history[0].items() if k != "step"} if val_ex else {}
    if dist.main:
        _save_final(out, save)
        summary = {"beta": beta, "reference": "precomputed" if precompute_ref else "adapters off" if lora else "frozen copy",
                   **{f"start val {k}": v for k, v in start.items()}, **{f"best val {k}": v for k, v in result.best.items()}}
        _finish(out, cfg, result, summary, model.cfg.to_dict(), "Preference alignment (DPO) report")
    _done(dist)
    return FinetuneResult(out, result, {**result.best, **{f"start_{k}": v for k, v in start.items()}},
                          skipped + bad_train + bad_val)


# ---------------------------------------------------------------------- distillation
def finetune_distill(
    teacher_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    student_dir: str | os.PathLike | None = None,
    student_preset: str | None = None,
    student_overrides: dict[str, Any] | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    teacher_precision: str = "fp32",
    eval_windows: int = 64,
    cfg: FinetuneConfig | None = None,
    device: str | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Train a student on token shards (`slmkit data prepare`) against a teacher's softened
    next-token distribution; teacher, student and data must share one tokenizer."""
    from slmkit.config import ModelConfig
    from slmkit.data import SlidingWindowDataset
    from slmkit.model.transformer import Transformer
    from slmkit.train.objectives.distill import Distillation
    from slmkit.train.precision import DTYPES
    from slmkit.train.setup import check_same_tokenizer

    cfg = cfg or FinetuneConfig()
    if (student_dir is None) == (student_preset is None):
        raise InputError("give exactly one of --student MODEL_DIR or --student-preset NAME")
    if cfg.lora_rank and student_dir is None:
        raise InputError("LoRA adapts a trained student; with --student-preset the student is new, so train it fully")
    if teacher_precision not in ("fp32", "bf16"):
        raise InputError(f"--teacher-precision must be fp32 or bf16, not {teacher_precision!r}")
    tokenizer = Tokenizer.load(teacher_dir)
    if student_dir is not None and Tokenizer.load(student_dir).fingerprint() != tokenizer.fingerprint():
        raise InputError(f"teacher {teacher_dir} and student {student_dir} use different tokenizers; "
                         "distillation compares their next-token distributions token by token, so they must share one")
    check_same_tokenizer(tokenizer, str(data), str(teacher_dir))
    dist = setup_distributed()
    dev = _device(device, dist)
    teacher = load_model(teacher_dir).to(dev)
    torch.manual_seed(cfg.seed)
    if student_dir is not None:
        student = load_model(student_dir, dtype="float32")
    else:
        overrides = {"vocab_size": teacher.cfg.vocab_size, **(student_overrides or {})}
        student = Transformer(ModelConfig.from_preset(student_preset, **overrides))
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise InputError(f"student vocab_size {student.cfg.vocab_size} differs from the teacher's {teacher.cfg.vocab_size}")
    context = min(student.cfg.context_length, teacher.cfg.context_length)
    train = SlidingWindowDataset(data, context, split="train")
    val = SlidingWindowDataset(data, context, split="val")
    val = [val[i] for i in range(min(len(val), eval_windows))]
    lora = apply_lora(student, cfg)
    student.to(dev).train()
    objective = Distillation(teacher, temperature, alpha, DTYPES[teacher_precision] if teacher_precision != "fp32" else None)

    def save(target: Path) -> None:
        if lora:
            _save_lm(student, tokenizer, Path(student_dir), target, True, {})
        else:
            save_model_dir(student, target, tokenizer)

    out = Path(out)
    result = _fit(student, objective, train, val, cfg, out, save, dist, resume=resume, force=force, progress=progress)
    if dist.main:
        _save_final(out, save)
        _finish(out, cfg, result, {"teacher": str(teacher_dir), "temperature": temperature, "alpha": alpha,
                                   **{f"best val {k}": v for k, v in result.best.items()}},
                student.cfg.to_dict(), "Distillation report")
    _done(dist)
    return FinetuneResult(out, result, dict(result.best))
