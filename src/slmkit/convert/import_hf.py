"""Import a Hugging Face checkpoint (a local directory or a Hub id) as an slmkit model directory."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from slmkit._io import atomic_dir, read_json
from slmkit.config import ModelConfig
from slmkit.convert.families import HARMLESS_KEYS, Family, family_of
from slmkit.convert.weights import import_tensors, read_checkpoint
from slmkit.errors import InputError, MissingExtraError
from slmkit.model.io import save_model_dir
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json"]
GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")  # same names in both files


def from_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    *,
    strict: bool = True,
    force: bool = False,
) -> Path:
    """Convert an HF causal-LM checkpoint into the model directory `out`, with its tokenizer.

    `src` is a directory holding config.json and weights, or a Hub id (downloaded when online).
    Config keys the family mapping does not know are an error (`strict`) or a warning.
    """
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    directory = resolve_source(src)
    hf_config = _read_config(directory)
    family = family_of(hf_config)
    cfg = config_from_hf(hf_config, family, strict)
    model = Transformer(cfg)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    state = import_tensors(read_checkpoint(directory), family.checkpoint_tensors(cfg, hf_config), shapes, ignore=tied)
    missing, _ = model.load_state_dict(state, strict=False)
    missing = {name for name in missing if not name.endswith(family.zero)}  # buffers the family lacks stay zero
    if set(missing) - tied:  # a mapping that forgot a tensor would leave it randomly initialized
        raise InputError(f"the {family.name} mapping gives no value for {min(set(missing) - tied)}")
    model = model.to(DTYPES[dtype]).eval()
    tokenizer = _tokenizer(directory)
    with atomic_dir(out, force=force) as tmp:
        save_model_dir(model, tmp, tokenizer, generation_settings(directory), sampling_defaults=False)
    return Path(out)


def config_from_hf(hf_config: dict[str, Any], family: Family, strict: bool = True) -> ModelConfig:
    """The ModelConfig of an HF config.json; keys neither read by the family nor known to be
    harmless might change the math, so they are never ignored silently."""
    unknown = sorted(set(hf_config) - family.keys - HARMLESS_KEYS)
    if unknown:
        message = (f"config.json has keys the {family.name} mapping does not understand and that may change the model's "
                   f"outputs: {', '.join(unknown)}")
        if strict:
            raise InputError(message + "; pass --allow-unknown-config (strict=False) to import anyway")
        warnings.warn(message, stacklevel=3)
    try:
        return ModelConfig(**{**family.fixed, **family.read(hf_config)})
    except KeyError as e:
        raise InputError(f"config.json of a {family.name} model lacks {e.args[0]!r}") from None


def resolve_source(src: str | os.PathLike) -> Path:
    """A local directory as is; anything else that looks like `org/name` is fetched from the Hub."""
    path = Path(src)
    if path.is_dir():
        return path
    name = str(src)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/")):
        raise InputError(f"{src} is not a directory with an HF checkpoint (config.json + weights) nor a Hub id like org/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise MissingExtraError("huggingface_hub", "hf") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise InputError(
            f"cannot download {name} from the Hugging Face Hub (offline, or HF_HUB_OFFLINE=1, and not in the cache); "
            f"download it on a connected machine (e.g. `hf download {name} --local-dir DIR`) and pass that local DIR instead"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # unknown repository, no access, network failure
        raise InputError(f"cannot download {name} from the Hugging Face Hub: {str(e).splitlines()[0]}") from None


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise InputError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    return read_json(path)


def _tokenizer(directory: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer: tokenizer.json runs on the HF library; GPT-2 style
    vocab.json + merges.txt on slmkit's own byte-level BPE (identical ids); none when absent."""
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.load(directory, backend="hf")
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return Tokenizer.load(directory, backend="fast")
    return None


def generation_settings(directory: Path) -> dict[str, Any]:
    """generation.json values from HF's generation_config.json: its stop tokens and whichever
    sampling settings it gives, nothing invented."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    hf = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {k: hf[k] for k in GENERATION_KEYS if hf.get(k) is not None}
    eos = hf.get("eos_token_id")
    if eos is not None:
        out["stop_tokens"] = eos if isinstance(eos, list) else [eos]
    return out
