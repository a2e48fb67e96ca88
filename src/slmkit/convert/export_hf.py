"""Export an slmkit model directory in a Hugging Face family's format (transformers, vLLM)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from slmkit._io import atomic_dir, write_json
from slmkit.config import ModelConfig
from slmkit.convert.families import FAMILIES, Family, family_for
from slmkit.convert.peft import write_peft
from slmkit.convert.weights import export_tensors
from slmkit.errors import InputError, MissingExtraError
from slmkit.model.io import generation_defaults, load_model
from slmkit.model.lora import available_adapters
from slmkit.tokenizer import Tokenizer
from slmkit.tokenizer.hf_format import HF_BACKEND_KEY


def to_hf(model_dir: str | os.PathLike, out: str | os.PathLike, family: str | None = None, *, force: bool = False,
          max_shard_size: int | str = "5GB") -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json that
    `transformers.AutoModelForCausalLM.from_pretrained(out)` loads without custom code.

    `family` (e.g. "llama") picks the format; by default the first family that expresses the
    config exactly. A config no family expresses is an error naming the fields in the way.
    Weights above `max_shard_size` (bytes, or "500MB", "5GB") are split into
    model-0000N-of-0000M.safetensors shards with the standard model.safetensors.index.json.
    Each LoRA adapter under `model_dir/adapters/NAME` is written to `out/adapters/NAME` in PEFT's
    layout, with base_model_name_or_path `out`: `peft.PeftModel.from_pretrained(model, that dir)`.
    """
    try:
        from huggingface_hub import save_torch_state_dict
    except ImportError:
        raise MissingExtraError("huggingface_hub", "hf") from None
    model = load_model(model_dir)
    cfg = model.cfg
    fam = choose_family(cfg, family)
    nonzero = [n for n, t in model.state_dict().items() if fam.zero and n.endswith(fam.zero) and t.any()]
    if nonzero:
        raise InputError(f"this model cannot be written as {fam.name}: {nonzero[0]} is not zero "
                         f"({fam.name} has no router bias)")
    model_dir = Path(model_dir)
    tokenizer = Tokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    ids = _token_ids(tokenizer, generation_defaults(model_dir))
    hf_config = {"architectures": [fam.architecture], "model_type": fam.name, **fam.write(cfg), **ids,
                 "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch.")}
    tensors = fam.checkpoint_tensors(cfg, hf_config)
    with atomic_dir(out, force=force) as tmp:
        try:
            save_torch_state_dict(export_tensors(model.state_dict(), tensors), tmp, max_shard_size=max_shard_size,
                                  metadata={"format": "pt"})
        except ValueError as e:  # an unreadable size such as "5 gigs"
            raise InputError(f"max shard size {max_shard_size!r} is not a size like 500MB or 5GB: {e}") from None
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        if tokenizer is not None:
            tokenizer.save(tmp)
            config_path = tmp / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config.pop(HF_BACKEND_KEY, None)
            write_json(config_path, config)
        for name in available_adapters(model_dir):
            write_peft(tmp / "adapters" / name, model, model_dir / "adapters" / name, fam, str(Path(out).resolve()))
    return Path(out)


def choose_family(cfg: ModelConfig, family: str | None) -> Family:
    """`family` if it expresses `cfg` (an error naming the fields in the way if not), else the first that does."""
    if family is None:
        return family_for(cfg)
    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    if blockers := FAMILIES[family].blockers(cfg):
        raise InputError(f"this model cannot be written as {family}: {'; '.join(blockers)}")
    return FAMILIES[family]


def _token_ids(tokenizer: Tokenizer | None, generation: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids for config.json: eos from generation.json's stop tokens, else the tokenizer's."""
    if tokenizer is None:
        return {}
    known = {**tokenizer.added_tokens, **tokenizer.special_tokens}
    stops = [known.get(s, s) for s in generation.get("stop_tokens", [])]
    stops = [s for s in stops if isinstance(s, int)] or ([tokenizer.eot_id] if tokenizer.eot_token else [])
    return {
        "bos_token_id": known.get(tokenizer.bos_token) if tokenizer.bos_token else None,
        "eos_token_id": (stops[0] if len(stops) == 1 else stops) if stops else None,
        "pad_token_id": tokenizer.pad_id,
    }
