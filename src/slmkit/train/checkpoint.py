"""Checkpoints: `RUN/checkpoints/step-N/` = a model directory + `trainer_state/`; under
`--strategy fsdp`, sharded weights + `trainer_state/` instead (`slmkit.train.sharded`).

Each checkpoint is built in a hidden temporary directory and renamed into place, so a crash in
the middle of a save leaves at most a hidden leftover, never a `step-N` that looks complete.
`trainer_state/state.pt` holds tensors and plain Python values only and is read with
`weights_only=True` (no arbitrary pickle); `trainer_state/meta.json` is written last.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slmkit._io import atomic_dir, write_json
from slmkit.errors import InputError, OutputExistsError
from slmkit.model.io import load_model
from slmkit.model.transformer import Transformer

STATE = "trainer_state"
SHARDS = "shards"  # a sharded checkpoint's DCP directory
INITIAL = "initial"  # a sharded run's starting model directory, beside its step-N
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints_dir(run: Path) -> Path:
    return run / "checkpoints"


def check_run_dir(run: Path, resume: bool, force: bool) -> None:
    if run.exists() and not (resume or force):
        raise OutputExistsError(f"run directory {run} already exists; pass --resume to continue it or --force to start over")


def prepare_run_dir(run: Path, fresh: bool, config_name: str, config: dict[str, Any]) -> None:
    """Create `run` (emptied first when `fresh`), drop half-written saves and record the config."""
    if fresh and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    remove_partial_saves(run)
    write_json(run / config_name, config)


def save_checkpoint(run: Path, step: int, save_model: Callable[[Path], Any], state: dict[str, Any], keep: int) -> Path:
    """Write `step-N` atomically (`save_model(dir)` writes its model directory), then delete all
    but the newest `keep` checkpoints."""
    out = checkpoints_dir(run) / f"step-{step}"
    with atomic_dir(out, force=True) as tmp:
        save_model(tmp)
        (tmp / STATE).mkdir()
        torch.save(state, tmp / STATE / "state.pt")
        write_json(tmp / STATE / "meta.json", {"step": step, "tokens": state["tokens"]})
    for old in complete_checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return out


def complete_checkpoints(run: Path) -> list[Path]:
    """`step-N` directories that finished saving, oldest first."""
    root = checkpoints_dir(run)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.fullmatch(d.name)
            if m and (d / STATE / "meta.json").is_file():
                found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def remove_partial_saves(run: Path) -> None:
    """Delete hidden temporaries that a killed save left behind."""
    root = checkpoints_dir(run)
    if root.is_dir():
        for d in [*root.glob(".step-*"), *root.glob(f".{INITIAL}.*")]:
            shutil.rmtree(d, ignore_errors=True)


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDS).is_dir()


def initial_dir(run: Path) -> Path:
    return checkpoints_dir(run) / INITIAL


def latest_checkpoint(run: Path) -> Path | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[Transformer, dict[str, Any]]:
    """(model in train mode, trainer state); a truncated or corrupt checkpoint is an InputError.
    A sharded checkpoint's model is its run's initial one: the loop loads the trained weights."""
    return load_model(path.parent / INITIAL if is_sharded(path) else path).train(), load_state(path)


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain values only); a sharded one's also
    names its directory (`sharded`), where the loop finds weights and optimizer state."""
    try:
        state = torch.load(path / STATE / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on damage
        raise InputError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it to resume from an older one") from None
    if is_sharded(path):
        state["sharded"] = path
    return state


def trained_names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    """The state-dict names of what training changes: the parameters in `params` and the learned
    buffers (the MoE router bias; quantized weights under QLoRA stay frozen)."""
    from slmkit.quant.linear import QUANTIZED_LINEARS

    trained = {id(p) for p in params}
    frozen = {id(b) for m in model.modules() if isinstance(m, QUANTIZED_LINEARS) for b in m.buffers()}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    names |= {n for n, b in model.named_buffers() if b.is_floating_point() and id(b) not in frozen}
    return names & model.state_dict(keep_vars=True).keys()  # not the buffers derived at load (RoPE tables)


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and python, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
