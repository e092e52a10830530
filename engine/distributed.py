"""Process groups, the parallel strategies (single, ddp, fsdp2) and activation checkpointing.

gloo on CPU, nccl on GPU. FSDP2 follows torchtitan: activation checkpointing first, then
`fully_shard` on each decoder layer bottom-up, then on the root, with
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` on GPU; the last layer is not
resharded after forward since backward needs it at once.

Activation checkpointing wraps each LLM decoder layer (and each ViT block, only when the ViT
trains: a frozen ViT runs under no_grad and keeps no activations) in torch's non-reentrant
checkpoint. The recompute in backward restores the CPU and CUDA random states of the forward,
so LoRA dropout draws the same masks twice and the gradients equal those without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pefomed.engine.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the torchrun process group when there is one; pick the device."""
    use_cuda = torch.cuda.is_available() if device_preference == "auto" else device_preference == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_ints(value: int, env: DistEnv) -> list[int]:
    """Every rank's `value`, in rank order, on every rank (one small all-reduce)."""
    box = torch.zeros(env.world_size, dtype=torch.long, device=env.device)
    box[env.rank] = value
    return [int(v) for v in all_reduce_sum(box).tolist()]


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order (for rare events, not for every step)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks, the units that FSDP2 shards."""
    return list(model.llm.model.layers)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap the LLM's decoder layers (and the ViT's blocks if the ViT trains) in place.

    Returns the number of wrapped blocks. Parameter names gain `_checkpoint_wrapped_module.`;
    `torch.distributed.checkpoint.state_dict` (what checkpoints use) strips it again.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    lists = [model.llm.model.layers]
    vit = getattr(model, "vit", None)
    if vit is not None and (getattr(model, "train_vit", False) or any(p.requires_grad for p in vit.parameters())):
        lists.append(vit.blocks)
    wrapped = 0
    for blocks in lists:
        for i, block in enumerate(blocks):
            if not isinstance(block, CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(
                    block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True
                )
                wrapped += 1
    return wrapped


def apply_strategy(
    model: nn.Module,
    strategy: str,
    env: DistEnv,
    compute_dtype: torch.dtype,
    *,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Activation checkpointing (when asked), then the strategy's wrapping; returns the model to train."""
    if strategy == "single" and env.distributed:
        raise ConfigError(
            f"train.strategy=single but torchrun started {env.world_size} processes; use train.strategy=ddp or fsdp2"
        )
    if strategy not in ("single", "ddp", "fsdp2"):
        raise ConfigError(f"train.strategy={strategy!r} is not implemented by this engine; use single, ddp or fsdp2")
    if activation_checkpointing:
        n = apply_activation_checkpointing(model)
        logger.info("activation checkpointing: %d blocks recompute their activations in backward", n)
    if strategy == "single":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return _fully_shard(model, env, compute_dtype)


def _fully_shard(model: nn.Module, env: DistEnv, compute_dtype: torch.dtype) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if env.device.type == "cuda" and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on the micro-steps before the last one of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
