"""Sharded checkpoints (`--strategy fsdp`), with `torch.distributed.checkpoint` (DCP).

    RUN/checkpoints/initial/          the model directory the run started from, written once
    RUN/checkpoints/step-N/shards/    DCP: the trained weights, AdamW state (and the best
                                      evaluation's weights), each process writing its own shards
    RUN/checkpoints/step-N/trainer_state/
                                      state.pt (data position, RNG, scaler, validation history),
                                      meta.json (written last: the checkpoint is complete)

Every process writes its shards in the background (`dcp.async_save`, over a gloo group of its own
so it never interleaves with training's collectives) into a hidden `.step-N.sharded.tmp`; once
all have written, rank 0 adds meta.json and renames it `step-N`, so a crash mid-save leaves a
hidden leftover, never a `step-N` that looks complete. DCP stores each tensor with its global
shape, so any number of processes can load it: a run saved by 2 resumes on 1 or 4.
`consolidate` turns a step into a plain model directory: initial/'s files with the step's weights.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from slmkit._io import atomic_dir, read_json, write_json
from slmkit.errors import InputError, OutputExistsError
from slmkit.train.checkpoint import INITIAL, SHARDS, STATE, checkpoints_dir, complete_checkpoints, is_sharded
from slmkit.train.distributed import Dist

def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW state keyed by parameter name (not position), so it loads into any sharding."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


class ShardedSaver:
    """Background sharded saves of one run; `wait()` finishes the pending one."""

    def __init__(self, run: Path, keep: int, dist: Dist) -> None:
        self.run, self.keep, self.dist = run, keep, dist
        self.group = torch_dist.new_group(backend="gloo")
        self.pending: tuple[Any, Path, int, dict[str, Any]] | None = None

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Start saving `step-N`: `state` (plain values, rank 0's) and `tensors` (this process's
        shards: {"model": ..., "optimizer": ..., ...})."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        tmp = checkpoints_dir(self.run) / f".step-{step}.sharded.tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE).mkdir(parents=True)
            torch.save(state, tmp / STATE / "state.pt")
        self.dist.barrier()
        future = dcp.async_save(tensors, checkpoint_id=tmp / SHARDS, process_group=self.group)
        self.pending = (future, tmp, step, {"step": step, "tokens": state["tokens"], "processes": self.dist.world})

    def wait(self) -> None:
        if self.pending is None:
            return
        future, tmp, step, meta = self.pending
        self.pending = None
        future.result()  # DCP's coordinator writes the metadata after every process has written
        if self.dist.main:
            write_json(tmp / STATE / "meta.json", meta)
            out = checkpoints_dir(self.run) / f"step-{step}"
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
            for old in complete_checkpoints(self.run)[:-self.keep]:
                shutil.rmtree(old)


def stored_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """{name: global shape} of every tensor in `checkpoint`'s shards ("model.<name>", ...)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(checkpoint / SHARDS)).read_metadata()
    except Exception as e:  # missing or damaged .metadata
        raise InputError(f"checkpoint {checkpoint} is corrupt or truncated ({type(e).__name__}); "
                         "delete it to resume from an older one") from None
    return {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def check_fits(checkpoint: Path, shapes: dict[str, tuple[int, ...]], *, complete: bool = True) -> None:
    """The checkpoint's trained weights have `shapes` (name -> shape): all of them, or with
    `complete=False` some of them. A checkpoint of another model, or of this one under other
    settings, is an InputError naming one difference."""
    stored = {k[len("model."):]: s for k, s in stored_shapes(checkpoint).items() if k.startswith("model.")}
    names = sorted(set(stored) | set(shapes)) if complete else sorted(stored)
    for name in names:
        if name not in shapes:
            problem = f"it has {name}, which this model lacks"
        elif name not in stored:
            problem = f"it lacks this model's {name}"
        elif stored[name] != tuple(shapes[name]):
            problem = f"{name} is {list(stored[name])} there, {list(shapes[name])} here"
        else:
            continue
        raise InputError(f"checkpoint {checkpoint} is of another model ({problem}); "
                         "resume with the model and settings the run started with")


def load(checkpoint: Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (as passed to `ShardedSaver.save`, on any number of processes) in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        with warnings.catch_warnings():  # loading in one process is intended here, not a fallback
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=checkpoint / SHARDS, no_dist=not torch_dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP wraps every reader failure in CheckpointException
        raise InputError(f"checkpoint {checkpoint} is corrupt or truncated ({type(e).__name__}); "
                         "delete it to resume from an older one") from None


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state)


# ---------------------------------------------------------------------- consolidation
def consolidate(checkpoint: str | Path, out: str | Path, force: bool = False) -> Path:
    """`RUN/checkpoints/step-N` of a sharded run -> a model directory at `out`, as the run's
    final/ would be at that step: the files of its initial/ with the step's trained weights (a
    classifier directory for a classifier; base files + adapters/ for a LoRA run)."""
    checkpoint = Path(checkpoint)
    if Path(out).exists() and not force:  # before the gathering, not after it
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    if not (checkpoint / STATE / "meta.json").is_file():
        raise InputError(f"{checkpoint} is not a complete checkpoint (no {STATE}/meta.json); "
                         "give RUN/checkpoints/step-N")
    if not is_sharded(checkpoint):
        raise InputError(f"{checkpoint} is not sharded: it was saved with --strategy ddp and is a model directory "
                         "already (load it as it is)")
    initial = checkpoint.parent / INITIAL
    if not (initial / "config.json").is_file():
        raise InputError(f"{initial} is missing: a sharded checkpoint takes its model files from its run's "
                         "checkpoints/initial/; keep step-N beside it")
    model, write = _open_like(initial)
    state = model.state_dict()
    check_fits(checkpoint, {k: tuple(v.shape) for k, v in state.items()}, complete=False)
    stored = [k[len("model."):] for k in stored_shapes(checkpoint) if k.startswith("model.")]
    load(checkpoint, {"model": {k: state[k] for k in stored}})
    with atomic_dir(out, force=force) as tmp:
        shutil.copytree(initial, tmp, dirs_exist_ok=True)
        write(tmp)
    return Path(out)


def _open_like(initial: Path) -> tuple[nn.Module, Callable[[Path], None]]:
    """The model initial/ holds, built as training built it (with its adapters, as a classifier),
    and a writer of that model's trained weights into a copy of initial/."""
    from slmkit.model.classifier import HEAD_WEIGHTS, LABELS, SequenceClassifier
    from slmkit.model.io import load_model, save_model_dir
    from slmkit.model.lora import ADAPTER_CONFIG, load_adapter, save_adapter
    from safetensors.torch import load_file, save_file

    transformer = load_model(initial, dtype="float32")
    adapters = sorted(d for d in (initial / "adapters").glob("*") if (d / ADAPTER_CONFIG).is_file())
    for d in adapters:
        load_adapter(transformer, d, d.name)
    labels = read_json(initial / LABELS) if (initial / LABELS).is_file() else None
    model: nn.Module = transformer
    if labels is not None:
        model = SequenceClassifier(transformer, labels["labels"], labels.get("pooling", "last"))
        model.score.load_state_dict(load_file(str(initial / HEAD_WEIGHTS)))

    def write(target: Path) -> None:
        for d in adapters:
            base = read_json(d / ADAPTER_CONFIG).get("base_model_name_or_path")
            save_adapter(transformer, target / "adapters" / d.name, d.name, base_model=base)
        if not adapters:  # the weights trained: config.json and the weights file (the other files stay initial/'s)
            save_model_dir(transformer, target)
        if labels is not None:
            save_file({k: v.detach().contiguous() for k, v in model.score.state_dict().items()}, str(target / HEAD_WEIGHTS))

    return model, write
