"""Reading HF checkpoints safely, and moving tensors between HF and slmkit names."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from slmkit.convert.families import Tensor
from slmkit.errors import InputError

# Buffers some checkpoints carry that hold no weights (recomputed by every implementation).
BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory: safetensors (one file, or shards with an index),
    else `pytorch_model.bin` read with `weights_only=True`, which refuses pickled code."""
    for index_name, load in (("model.safetensors.index.json", _load_safetensors), ("pytorch_model.bin.index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise InputError(f"{directory}: shard {missing[0]} named in {index_name} is missing ({len(missing)} of {len(shards)} shards missing)")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise InputError(f"{directory} has no weights (model.safetensors, a sharded index, or pytorch_model.bin)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a `.bin` read with `weights_only=True`."""
    return _load_bin(path) if path.suffix == ".bin" else _load_safetensors(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {path} (corrupt or truncated?): {str(e).splitlines()[0]}") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"refused to load {path}: it contains pickled objects other than tensors, which could run code "
            f"({str(e).splitlines()[0][:200]}); ask for a safetensors version of the model"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise InputError(f"cannot read {path} (corrupt or truncated?): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return state


def import_tensors(hf_state: dict[str, torch.Tensor], mapping: list[Tensor], shapes: dict[str, torch.Size],
                   ignore: set[str]) -> dict[str, torch.Tensor]:
    """HF tensors -> slmkit state dict, splitting fused tensors; every shape is checked, and a
    tensor the mapping does not account for is an error rather than silently dropped."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for t in mapping:
        name = _find(hf_state, t.hf)
        used.add(name)
        w = hf_state[name]
        parts = [shapes[o] for o in t.ours]
        expected = (sum(s[0] for s in parts), *parts[0][1:])
        expected = expected[::-1] if t.transpose else expected
        if tuple(w.shape) != expected:
            raise InputError(f"tensor {name} has shape {tuple(w.shape)}, but config.json implies {expected}")
        w = w.t() if t.transpose else w
        w = t.rows.to_ours(w) if t.rows else w
        out.update(zip(t.ours, w.split([s[0] for s in parts], dim=0)))
    extra = sorted(n for n in set(hf_state) - used - ignore if not n.endswith(BUFFER_SUFFIXES))
    if extra:
        raise InputError(f"checkpoint has {len(extra)} tensor(s) the mapping does not use, e.g. {extra[0]}")
    return {k: v.contiguous() for k, v in out.items()}


def _find(state: dict[str, torch.Tensor], name: str) -> str:
    """`name`, or the same without its first component (base-model checkpoints lack `model.`)."""
    for candidate in (name, name.partition(".")[2]):
        if candidate in state:
            return candidate
    raise InputError(f"checkpoint has no tensor {name}")


def export_tensors(state: dict[str, torch.Tensor], mapping: list[Tensor]) -> dict[str, torch.Tensor]:
    """slmkit state dict -> HF tensors, fusing where the family fuses."""
    out = {}
    for t in mapping:
        w = torch.cat([state[o] for o in t.ours], dim=0) if len(t.ours) > 1 else state[t.ours[0]]
        w = t.rows.to_hf(w) if t.rows else w
        out[t.hf] = (w.t() if t.transpose else w).contiguous().clone()
    return out
