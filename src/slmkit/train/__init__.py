"""Training: ONE loop (`slmkit.train.loop.Loop`) for pretraining and every fine-tuning objective.

    from slmkit.train import TrainConfig, pretrain
    result = pretrain(TrainConfig(data="shards/", out="runs/tiny", preset="tiny", max_steps=2000))
    print(result.val_loss, result.tokens_per_s)

Runs unchanged under `torchrun --nproc_per_node=K`: DDP, or FSDP2 with sharded checkpoints
(`strategy="fsdp"`, `slmkit.train.parallel` and `slmkit.train.sharded`). Fine-tuning lives in
`slmkit.finetune`.
"""

from slmkit.train.loop import FitResult, Loop
from slmkit.train.recipe import FinetuneConfig, TrainConfig, load_recipe
from slmkit.train.schedule import lr_at
from slmkit.train.trainer import Trainer, TrainResult, pretrain

__all__ = ["FinetuneConfig", "FitResult", "Loop", "TrainConfig", "TrainResult", "Trainer", "load_recipe", "lr_at", "pretrain"]
