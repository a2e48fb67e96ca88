"""What a run starts from: the tokenizer, the data it must match, and the initial model."""

from __future__ import annotations

from pathlib import Path

import torch

from slmkit.config import ModelConfig
from slmkit.data import read_manifest
from slmkit.errors import InputError
from slmkit.model.io import load_model
from slmkit.model.transformer import Transformer
from slmkit.tokenizer import Tokenizer
from slmkit.train.recipe import TrainConfig


def load_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """--tokenizer, else the --init model's, else the copy `data prepare` keeps in DATA, else
    DATA/../tokenizer (data prepared before that copy was kept); its hash must match the data's."""
    if cfg.tokenizer:
        source = Path(cfg.tokenizer)
    elif cfg.init:
        source = Path(cfg.init)
    elif (Path(cfg.data) / "tokenizer.json").is_file():
        source = Path(cfg.data)
    else:
        source = Path(cfg.data).resolve().parent / "tokenizer"
        if not source.is_dir():
            raise InputError(f"no tokenizer given, none in {cfg.data} and none at {source}; "
                             "pass --tokenizer DIR (the one the data was prepared with)")
    tokenizer = Tokenizer.load(source)
    check_same_tokenizer(tokenizer, cfg.data, str(source))
    if cfg.init and cfg.tokenizer:
        check_same_tokenizer(Tokenizer.load(cfg.init), cfg.data, cfg.init)
    return tokenizer


def check_same_tokenizer(tokenizer: Tokenizer, data: str, source: str) -> None:
    expected = read_manifest(data)["tokenizer"]["fingerprint"]
    if tokenizer.fingerprint() != expected:
        raise InputError(
            f"data prepared with a different tokenizer than the model's (hash mismatch): {data} was "
            f"tokenized with {expected[:12]}, {source} is {tokenizer.fingerprint()[:12]}; re-run data prepare with this tokenizer"
        )


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> Transformer:
    """A fresh model from the preset (vocab_size from the tokenizer unless set), or the --init one."""
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model = load_model(cfg.init, dtype="float32").train()  # fp32 master weights, whatever the stored dtype
        if cfg.model:
            model_cfg = model.cfg.replace(**cfg.model)
            state = model.state_dict()
            model = Transformer(model_cfg)
            model.load_state_dict(state)
    else:
        model = Transformer(ModelConfig.from_preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size, **cfg.model}))
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise InputError(f"vocab_size {model.cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return model
