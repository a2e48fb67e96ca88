"""LoRA adapters in PEFT's layout for a model's Hugging Face export, and PEFT's adapters read back.

PEFT names an adapted module as the HF model names it (`model.layers.0.self_attn.q_proj`, GPT-2's
`transformer.h.0.attn.c_attn`) and stores `base_model.model.<module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] in `adapter_model.safetensors`; `peft.PeftModel.from_pretrained(hf_model,
directory)` loads it. The names come from the family mapping (`families.py`), weight by weight:

- A fused HF linear (GPT-2's `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`) holds several slmkit
  linears. Their adapters become one of rank r_q + r_k + r_v: A = [A_q; A_k; A_v] stacked and B
  block-diagonal, the same update exactly (a linear without an adapter gets zero rows of B). Read
  back, B's rows split by output and every part keeps the whole A.
- GPT-2's Conv1D layers store their weights transposed; LoRA's A and B keep their shapes there
  (`fan_in_fan_out` only tells PEFT how to merge).
- DeepSeek's interleaved RoPE rows are B's output rows, reordered as the weight's are.
- Experts of a mixture-of-experts layer are refused: transformers keeps a layer's experts in one
  3-D tensor, which PEFT's LoRA does not adapt expert by expert.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.convert.families import FAMILIES, Family, InterleavedRope, family_for
from slmkit.errors import InputError
from slmkit.model.lora import PEFT_WEIGHTS, LoRAWeights, find_adapter, linear_features, read_adapter, write_adapter


@dataclass(frozen=True)
class ModuleMap:
    """One HF linear = the slmkit linears `ours`, stacked by output rows."""

    hf: str
    ours: tuple[str, ...]
    conv1d: bool
    rows: InterleavedRope | None


def module_maps(fam: Family, cfg: ModelConfig, linears: set[str]) -> list[ModuleMap]:
    """The HF linears of `fam` for `cfg`, from its weight tensors (checkpoint layout as `to_hf` writes it)."""
    out = []
    for t in fam.checkpoint_tensors(cfg, fam.write(cfg)):
        ours = tuple(o.removesuffix(".weight") for o in t.ours)
        if t.hf.endswith(".weight") and all(o.endswith(".weight") for o in t.ours) and set(ours) <= linears:
            out.append(ModuleMap(t.hf.removesuffix(".weight"), ours, t.transpose, t.rows))
    if "lm_head" in linears and not any(m.ours == ("lm_head",) for m in out):  # tied: no tensor of its own
        out.append(ModuleMap("lm_head", ("lm_head",), False, None))
    return out


def to_hf_names(layers: dict[str, LoRAWeights], features: dict[str, tuple[int, int]], fam: Family, cfg: ModelConfig,
                where: Path) -> tuple[dict[str, LoRAWeights], set[str], bool]:
    """slmkit adapter layers -> (PEFT's layers by HF module, every HF linear's name, whether a
    Conv1D layer is adapted)."""
    experts = sorted(n for n in layers if ".experts." in n)
    if experts:
        raise InputError(f"{where} adapts {experts[0]}, an expert of a mixture-of-experts layer: transformers keeps a "
                         "layer's experts in one 3-D tensor, which PEFT's LoRA does not adapt expert by expert; adapt the "
                         "attention projections instead (--lora-targets q,k,v,o), or merge it (`slmkit lora merge`)")
    maps = module_maps(fam, cfg, set(features))
    unmapped = sorted(set(layers) - {o for m in maps for o in m.ours})
    if unmapped:
        raise InputError(f"{where} adapts {unmapped[0]}, which has no linear of its own in the {fam.name} format")
    out, conv1d = {}, False
    for m in maps:
        present = [o for o in m.ours if o in layers]
        if not present:
            continue
        sizes = [features[o][0] for o in m.ours]
        starts = dict(zip(m.ours, itertools.accumulate([0, *sizes])))
        scaling = layers[present[0]].scaling
        a = torch.cat([layers[o].a for o in present])
        b = a.new_zeros(sum(sizes), a.shape[0])
        col = 0
        for o in present:
            w = layers[o]
            b[starts[o] : starts[o] + features[o][0], col : col + w.rank] = w.b * (w.scaling / scaling)
            col += w.rank
        out[m.hf] = LoRAWeights(a, m.rows.to_hf(b) if m.rows else b, scaling)
        conv1d |= m.conv1d
    return out, {m.hf for m in maps}, conv1d


def from_hf_names(layers: dict[str, LoRAWeights], model: nn.Module, path: Path) -> dict[str, LoRAWeights]:
    """PEFT's layers by HF module -> slmkit's, through the first family that expresses the model
    and has every adapted module."""
    cfg, features = model.cfg, linear_features(model)
    candidates = [f for f in FAMILIES.values() if not f.blockers(cfg)] or [family_for(cfg)]  # none: family_for explains
    tried = [{m.hf: m for m in module_maps(fam, cfg, set(features))} for fam in candidates]
    maps = next((m for m in tried if set(layers) <= set(m)), None)
    if maps is None:
        unknown = min(set(layers) - set(tried[0]))
        raise InputError(f"{path}: the adapter adapts {unknown}, which a {candidates[0].name} model like this one has "
                         f"no linear layer for (an adapter for another architecture?)")
    out = {}
    for hf, w in layers.items():
        m = maps[hf]
        sizes = [features[o][0] for o in m.ours]
        if w.b.shape[0] != sum(sizes) or w.a.shape[1] != features[m.ours[0]][1]:
            raise InputError(f"{path}: {hf} has lora_A {tuple(w.a.shape)} and lora_B {tuple(w.b.shape)}, but the model's "
                             f"layer is {sum(sizes)}x{features[m.ours[0]][1]} (an adapter for another base model?)")
        b = m.rows.to_ours(w.b) if m.rows else w.b
        out.update({o: LoRAWeights(w.a, part.contiguous(), w.scaling) for o, part in zip(m.ours, b.split(sizes))})
    return out


def write_peft(directory: str | os.PathLike, model: nn.Module, adapter_dir: str | os.PathLike, fam: Family,
               base_model: str | None) -> Path:
    """The adapter in `adapter_dir` (either layout), for `model` written as `fam`, in PEFT's layout."""
    adapter = read_adapter(adapter_dir, model)
    layers, universe, conv1d = to_hf_names(adapter.layers, linear_features(model), fam, model.cfg, Path(adapter_dir))
    return write_adapter(directory, layers, universe, adapter.dropout, base_model, PEFT_WEIGHTS[0], {"fan_in_fan_out": conv1d})


def export_peft(model_dir: str | os.PathLike, out: str | os.PathLike, adapter: str = "default", *,
                family: str | None = None, base_model: str | None = None, force: bool = False) -> Path:
    """Write adapter `adapter` of `model_dir` (a name under adapters/, or an adapter directory) to
    `out` in PEFT's layout, for the `convert to-hf` export of the model (`family` as there);
    `base_model` (a Hub id or directory) becomes base_model_name_or_path."""
    from slmkit._io import atomic_dir
    from slmkit.convert.export_hf import choose_family
    from slmkit.model.io import read_config
    from slmkit.model.transformer import Transformer

    adapter_dir = find_adapter(model_dir, adapter)
    cfg, _ = read_config(model_dir)
    fam = choose_family(cfg, family)
    with torch.device("meta"):  # names and shapes only
        model = Transformer(cfg)
    with atomic_dir(out, force=force) as tmp:
        write_peft(tmp, model, adapter_dir, fam, base_model)
    return Path(out)
