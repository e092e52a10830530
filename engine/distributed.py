"""Process groups, the parallel strategies and activation checkpointing.

gloo on CPU, nccl on GPU. The strategies:

- `single`, `ddp`: the whole model on every rank (DDP averages the gradients over ranks).
- `fsdp2`: torchtitan's order (see `engine.sharded_loading`): build on the meta device, then
  `fully_shard` the ViT as one unit, the embeddings, each decoder layer and norm + head, then the
  root, with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` on GPU; the last layer is
  not resharded after forward since backward needs it at once. The gradient reduction sums
  (`set_gradient_divide_factor(1.0)`), so the trainer's token normalization is the whole scaling.
- `deepspeed`: ZeRO-2/3 through `deepspeed.initialize` (`engine.deepspeed_strategy`).

The trainer drives every strategy through one `Runtime`: the module to call, `backward`, the
accumulation boundary, `step` (clip, optimizer, schedule) and the checkpointed state. `TorchRuntime`
(here) serves single, ddp and fsdp2 with a torch AdamW; `DeepSpeedRuntime` lets DeepSpeed's engine
own the optimizer, its clipping and its state.

Activation checkpointing wraps each LLM decoder layer (and each ViT block, only when the ViT
trains: a frozen ViT runs under no_grad and keeps no activations) in torch's non-reentrant
checkpoint. The recompute in backward restores the CPU and CUDA random states of the forward,
so LoRA dropout draws the same masks twice and the gradients equal those without it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from pefomed.engine.config import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed")
# Strategies that need a process group even in one process (FSDP2's mesh, DeepSpeed's comm).
NEED_GROUP = ("fsdp2", "deepspeed")


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


def init_distributed(device_preference: str = "auto", strategy: str = "single") -> DistEnv:
    """Join the torchrun (or `deepspeed` launcher) process group when there is one; pick the device.

    fsdp2 and deepspeed get a process group in one process too (a one-rank group over an
    in-memory store when no launcher set MASTER_ADDR), so they run, and resume, at world size 1.
    """
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
    import_before_the_group(strategy, device)
    if (world_size > 1 or strategy in NEED_GROUP) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:
            store = attempt_store(rank, world_size)
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, device_id=device if use_cuda else None
            )
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            # What a launcher would have said; DeepSpeed reads LOCAL_RANK from the environment.
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
                os.environ.setdefault(key, "1" if "WORLD" in key else "0")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def import_before_the_group(strategy: str, device: torch.device) -> None:
    """Import the modules that take `GroupMember.WORLD` as a default argument value: imported after
    the group exists, such a default holds the group until the interpreter exits, and gloo's
    threads with it (see `shutdown_distributed`). Those are `torch.distributed.nn.functional`
    (which torch's checkpoint helpers import) and DeepSpeed's torch backend, which also reads
    DS_ACCELERATOR when DeepSpeed is first imported."""
    import torch.distributed.nn.functional  # noqa: F401

    if strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed.comm.torch  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                f"train.strategy=deepspeed needs DeepSpeed, which does not import here ({e}): "
                "pip install 'pefomed[deepspeed]', or pick train.strategy=fsdp2 or ddp"
            ) from e


def attempt_store(rank: int, world_size: int) -> dist.Store:
    """The launcher's TCPStore (MASTER_ADDR:MASTER_PORT), with keys of this restart attempt only.

    torchrun shares its rendezvous store with the workers and keeps it across `--max-restarts`
    restarts, so a restarted group finds the gloo/NCCL addresses that the killed group left in
    it; two ranks that read different generations each wait for the other to connect, forever.
    A prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps the generations apart. Otherwise
    this is `init_process_group`'s env:// store: the agent's when torchrun shares it, rank 0's
    under other launchers.
    """
    from datetime import timedelta

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent and rank == 0,
        timeout=timedelta(minutes=30),
        multi_tenant=not agent,
    )
    return dist.PrefixStore(f"pefomed/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown_distributed(leave_together: bool = False) -> None:
    """Destroy the process group, and free its backend while Python is still alive.

    `leave_together` (a rank's normal end) waits at a barrier first, so no rank tears the group
    down under a peer that still needs it. After an error there is no barrier, since a peer may
    never reach it.

    Freeing the backend here matters for gloo: its worker threads drop each finished work after
    reporting it done, and a work (a barrier holds the works before it) may own the last
    reference to tensors whose Python objects then need the GIL. A worker that asks for the GIL
    once the interpreter is finalizing is ended by `pthread_exit`, which aborts the process
    ("terminate called without an active exception"). The backend, and with it those threads,
    goes when nothing references the group (DeepSpeed's engine must be destroyed first:
    `DeepSpeedRuntime.close`). Device meshes hold their groups, and DTensor's
    caches (sharding propagation, redistribution plans, mesh topology) keep meshes alive after
    the model is gone, so each mesh still alive lets go of its groups here. `gloo_threads` tells
    whether they went.
    """
    if dist.is_initialized():
        if leave_together and dist.get_world_size() > 1:
            dist.barrier()
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()  # also drops DeepSpeed's module-level group handles
        else:
            dist.destroy_process_group()
        release_device_meshes()
        gc.collect()  # a sharded model's modules and device mesh sit in reference cycles
        live = gloo_threads()
        if leave_together and live:
            logger.warning(
                "the process group is destroyed but still referenced (%d gloo threads live): "
                "drop the model before shutdown_distributed, or the process may abort at exit",
                live,
            )


@contextmanager
def leaving_together() -> Iterator[None]:
    """A rank's work with the process group: at a normal end of the block, every rank waits for
    the others and the group is destroyed (`shutdown_distributed(leave_together=True)`); after an
    error it is destroyed at once. Run the work in a function of its own inside the block, so that
    its model, which holds the group, is gone before the group is."""
    try:
        yield
        shutdown_distributed(leave_together=True)
    finally:
        shutdown_distributed()  # after an error: no barrier (a no-op when already shut down)


def release_device_meshes() -> None:
    """Every live DeviceMesh drops its process groups (torch 2.13 keeps them in `_pg_registry`), which
    are destroyed and of no further use. The group's destructor releases the GIL, so its worker
    threads can finish their last work while it joins them."""
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():  # unreachable meshes too: the caller's collection frees them after
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def gloo_threads() -> int:
    """How many of gloo's threads (its work loop and its TCP loop) this process still runs."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(task.read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sum(name in ("pt_gloo_runloop", "gloo_tcp_loop") for name in names)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
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
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks, the units that FSDP2 shards."""
    return list(unwrap(model).llm.model.layers)


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full", every: int = 2) -> int:
    """Wrap the decoder layers that `mode` (none | full | selective, every `every`-th layer; a
    bool means full / none) selects, and the ViT's blocks if the ViT trains, in place
    (engine/activation_checkpointing.py). Returns the number of wrapped blocks."""
    from pefomed.engine import activation_checkpointing

    return activation_checkpointing.apply_activation_checkpointing(model, mode, every)


def check_strategy(strategy: str, env: DistEnv) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy={strategy!r} is not implemented by this engine; use one of {STRATEGIES}")
    if strategy == "single" and env.distributed:
        raise ConfigError(
            f"train.strategy=single but torchrun started {env.world_size} processes; use train.strategy=ddp, "
            "fsdp2 or deepspeed"
        )


def apply_strategy(
    model: nn.Module,
    strategy: str,
    env: DistEnv,
    compute_dtype: torch.dtype,
    *,
    activation_checkpointing: bool | str = False,
    ac_every: int = 2,
) -> nn.Module:
    """Activation checkpointing (when asked), then the strategy's wrapping of a built model.

    For fsdp2 this shards a model that is already materialized; `engine.sharded_loading` builds
    one on the meta device and shards it before any weight is loaded. deepspeed wraps the model
    together with its optimizer (`engine.deepspeed_strategy.DeepSpeedRuntime`), so here it only
    gets activation checkpointing.
    """
    check_strategy(strategy, env)
    apply_activation_checkpointing(model, activation_checkpointing, ac_every)  # logs what it wrapped
    if strategy in ("single", "deepspeed"):
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    return fully_shard_model(model, env, compute_dtype)


def shard_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """torchtitan's FSDP2 units, bottom-up: the ViT, the embeddings, each decoder layer, and norm +
    head (one unit with the embeddings when the weights are tied). The root takes the rest: the
    connector and ln_vision."""
    llm = model.llm
    units: list[nn.Module | list[nn.Module]] = []
    if getattr(model, "vit", None) is not None:
        units.append(model.vit)
    tied = llm.lm_head.weight is llm.model.embed_tokens.weight
    if not tied:
        units.append(llm.model.embed_tokens)
    units.extend(llm.model.layers)
    units.append([llm.model.embed_tokens, llm.model.norm, llm.lm_head] if tied else [llm.model.norm, llm.lm_head])
    return units


def fully_shard_model(model: nn.Module, env: DistEnv, compute_dtype: torch.dtype) -> nn.Module:
    """`fully_shard` on each unit of `shard_units` and then the root; gradients are summed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if env.device.type == "cuda" and compute_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    from torch.distributed.fsdp import FSDPModule

    llm = model.llm
    for unit in shard_units(model):
        # Backward starts with the head and the last layer: they stay gathered after forward
        # (torchtitan). A frozen ViT has no backward, so it must reshard after its forward.
        last = unit is llm.model.layers[-1] or (isinstance(unit, list) and unit[-1] is llm.lm_head and len(unit) == 2)
        fully_shard(unit, reshard_after_forward=not last, **kwargs)
    fully_shard(model, **kwargs)
    # The trainer scales the loss by 1 / (target tokens over all ranks), so the reduction sums.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on the micro-steps before the last one of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------- what the trainer drives


class Runtime(Protocol):
    """One strategy's training step and state, as the trainer sees it."""

    model: nn.Module  # called as model(batch) -> (mean loss over local targets, local target count)
    module: nn.Module  # the VisionLanguageModel inside any wrapper
    optimizer: torch.optim.Optimizer
    # The gradient reduction divides by this (DDP and DeepSpeed average over ranks: world size;
    # FSDP2 sums: 1); the trainer multiplies the loss by it.
    grad_divisor: int

    def set_boundary(self, last: bool) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> torch.Tensor: ...  # clip, update, schedule; the gradient norm (not synced)
    def set_schedule_step(self, step: int) -> None: ...
    def lr(self) -> float: ...
    def save_state(self, folder: Path) -> None: ...  # every rank; `folder` is trainer_state/
    def load_state(self, folder: Path, saved_world_size: int) -> None: ...
    def full_trainable_state(self) -> dict[str, torch.Tensor]: ...  # every rank; full fp32 copies


class TorchCheckpointState:
    """A model and its torch optimizer as a checkpoint sees them: a `torch.distributed.checkpoint`
    of the trainable parameters and the optimizer (resharded by DCP when the world size changes),
    and whole copies of the trainable parameters. `TorchRuntime` is one; engine.checkpoint makes
    one for callers that hold no runtime."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def save_state(self, folder: Path) -> None:
        from pefomed.engine.checkpoint import save_dcp_state

        save_dcp_state(self.model, self.optimizer, folder)

    def load_state(self, folder: Path, saved_world_size: int) -> None:
        from pefomed.engine.checkpoint import load_dcp_state

        load_dcp_state(self.model, self.optimizer, folder)

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        from pefomed.engine.checkpoint import full_trainable_state

        return full_trainable_state(self.model)


class TorchRuntime(TorchCheckpointState):
    """single, ddp and fsdp2: torch AdamW, `clip_grad_norm_`, the warmup-cosine schedule, and a
    `torch.distributed.checkpoint` of the trainable parameters and the optimizer (resharded by
    DCP when the world size changes)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, env: DistEnv,
                 grad_clip: float) -> None:  # fmt: skip
        super().__init__(model, optimizer)
        self.module, self.scheduler = unwrap(model), scheduler
        self.env, self.grad_clip = env, grad_clip
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        ddp = hasattr(model, "require_backward_grad_sync")
        self.grad_divisor = env.world_size if ddp else 1

    def set_boundary(self, last: bool) -> None:
        set_gradient_sync(self.model, last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    def set_schedule_step(self, step: int) -> None:
        self.scheduler.set_step(step)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
