"""How the one training loop spreads over the processes `torchrun` starts: `--strategy ddp|fsdp`.

    ddp   every process holds the whole model, optimizer state and gradients; DDP averages the
          gradients (on the last micro-step of an accumulated step only)
    fsdp  FSDP2: `fully_shard` per transformer block, then the root (embeddings, final norm, head,
          MTP modules).
          Each of K processes holds 1/K of every parameter, gradient and AdamW state and gathers a
          block's full weights only while that block runs; gradients are reduce-scattered after
          every micro-step, so accumulation keeps sharded gradients. Under bf16 the gathered
          weights are bf16 and the gradient reduction fp32 (`MixedPrecisionPolicy`);
          `cpu_offload` keeps the shards and the optimizer step on the CPU (CUDA only).

The loop sees the same few things either way (`Replicated`, `Sharded`): `model`, the module whose
parameters the optimizer steps; `forward`, what runs the forward pass (DDP, compiled, or the
sharded module itself); `no_sync`, `scaler` and `finish`, which puts the trained weights into the
caller's model. FSDP trains a sharded twin of the caller's model (built on the meta device, so
nothing is copied) and empties the caller's parameters meanwhile; `finish` gathers the trained
weights back, so the caller saves, evaluates and generates with a plain model afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from slmkit.errors import InputError
from slmkit.train.accel import compile_or_eager, enable_activation_checkpointing
from slmkit.train.distributed import Dist
from slmkit.train.precision import Precision


def check(cfg: Any, dist: Dist) -> None:
    """Settings that cannot work on these processes: raised before a run directory is touched."""
    if cfg.batch_size % dist.world:
        fits = (cfg.batch_size // dist.world + 1) * dist.world
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {dist.world} "
                         f"(each trains on batch_size / {dist.world} rows per micro-step); pass --batch-size {fits}")
    if cfg.cpu_offload and cfg.strategy != "fsdp":
        raise InputError("--cpu-offload offloads FSDP's parameter shards; use it with --strategy fsdp")
    if cfg.cpu_offload and dist.device.type != "cuda":
        raise InputError(f"--cpu-offload moves parameter shards from the GPU to the CPU; on {dist.device.type} "
                         "there is nothing to offload (drop --cpu-offload)")


def transformer_of(model: nn.Module) -> nn.Module:
    """The Transformer inside `model` (a classifier trains its backbone)."""
    return getattr(model, "backbone", model)


def scalar(value: torch.Tensor) -> float:
    """A reduced value as a float; the gradient norm over sharded gradients is a DTensor."""
    full = getattr(value, "full_tensor", None)
    return float((full() if full is not None else value).item())


def wrap(model: nn.Module, cfg: Any, dist: Dist, precision: Precision,
         compile_example: torch.Tensor | None = None) -> Replicated | Sharded:
    """Prepare `model` for the run `cfg` describes (cfg.strategy, cfg.activation_checkpointing,
    cfg.cpu_offload, checked by `check`); `compile_example` asks for torch.compile."""
    if cfg.strategy == "fsdp":
        return Sharded(model, dist, precision, cfg.activation_checkpointing, cfg.cpu_offload, compile_example)
    return Replicated(model, dist, precision, cfg.activation_checkpointing, compile_example)


class Replicated:
    """DDP: the whole model on every process (or just the model, in one process)."""

    sharded = False

    def __init__(self, model: nn.Module, dist: Dist, precision: Precision, activation_checkpointing: bool,
                 compile_example: torch.Tensor | None) -> None:
        self.model, self.dist, self.precision = model, dist, precision
        if activation_checkpointing:
            enable_activation_checkpointing(transformer_of(model))
        forward = compile_or_eager(model, compile_example) if compile_example is not None else model
        self.forward = nn.parallel.DistributedDataParallel(forward) if dist.enabled else forward

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients on the last micro-step of a step only."""
        return contextlib.nullcontext() if last or not self.dist.enabled else self.forward.no_sync()

    def scaler(self) -> torch.amp.GradScaler:
        return self.precision.scaler()

    def finish(self) -> nn.Module:
        return self.model


class Sharded:
    """FSDP2 over a sharded twin of the caller's model; see the module docstring."""

    sharded = True

    def __init__(self, owner: nn.Module, dist: Dist, precision: Precision, activation_checkpointing: bool,
                 cpu_offload: bool, compile_example: torch.Tensor | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.owner, self.dist, self.precision, self.device = owner, dist, precision, dist.device
        self.own_group = not torch_dist.is_initialized()
        if self.own_group:  # one process: FSDP needs a process group all the same (a group of one)
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(self.device.type, (dist.world,))
        options: dict[str, Any] = {"mesh": mesh}
        if precision.name == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()

        # 1) a twin on the meta device: its parameters take no memory, its buffers are the owner's own
        memo: dict[int, Any] = {id(b): b for b in owner.buffers()}
        memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                     for p in owner.parameters()})
        twin = copy.deepcopy(owner, memo)
        transformer = transformer_of(twin)
        if activation_checkpointing:
            enable_activation_checkpointing(transformer)
        # 2) shard: each block is one unit (gathered while it runs), the rest is the root's unit (with
        #    the MTP modules, whose parts the model calls one by one, outside their own forward)
        for block in transformer.layers:
            fully_shard(block, **options)
        fully_shard(twin, **options)
        # 3) allocate this process's shards (offloaded: in CPU memory) and fill them from the owner's weights, then free those
        home = torch.device("cpu") if cpu_offload else self.device
        twin._apply(lambda t: torch.empty_like(t, device=home) if t.is_meta else t)
        set_model_state_dict(twin, owner.state_dict(), options=StateDictOptions(full_state_dict=True))
        for p in owner.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.model = twin
        self.forward = compile_or_eager(twin, compile_example) if compile_example is not None else twin

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter after every micro-step: accumulating sharded gradients is what saves the memory."""
        return contextlib.nullcontext()

    def scaler(self) -> torch.amp.GradScaler:
        """fp16 loss scaling whose inf/NaN check covers every process's gradient shards."""
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(self.device.type, enabled=self.precision.name == "fp16")

    def finish(self) -> nn.Module:
        """Gather the trained weights into the owner (on every process) and return it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, p in self.owner.named_parameters():
                p.data = full[name].to(self.device)
        self.model = self.forward = None  # the shards are no longer needed
        if self.own_group:
            torch_dist.destroy_process_group()
        return self.owner
