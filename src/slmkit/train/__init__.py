"""Pretraining: `pretrain(TrainConfig(data=..., out=...))`, the library behind `slmkit pretrain`.

    from slmkit.train import TrainConfig, pretrain
    result = pretrain(TrainConfig(data="shards/", out="runs/tiny", preset="tiny", max_steps=2000))
    print(result.val_loss, result.tokens_per_s)

Runs unchanged under `torchrun --nproc_per_node=K` (DDP).
"""

from slmkit.train.config import TrainConfig, load_recipe
from slmkit.train.schedule import lr_at
from slmkit.train.trainer import Trainer, TrainResult, pretrain

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_recipe", "lr_at", "pretrain"]
