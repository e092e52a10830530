"""train.strategy: deepspeed — ZeRO-2 / ZeRO-3 through `deepspeed.initialize`, driven by the
trainer's one loop (`DeepSpeedRuntime` is a `distributed.Runtime`).

The engine gets our model, our AdamW parameter groups (the trainable parameters only: adapters
and projection; `DeepSpeedCPUAdam` over the same groups with `train.offload_optimizer: cpu`) and
our warmup-cosine schedule (`trainer.WarmupCosine`, which the engine steps). The trainer marks the
accumulation boundary itself (`set_gradient_accumulation_boundary`), calls `engine.backward` on
`loss * n_local * world / n_global` with `scale_wrt_gas=False` (the token normalization replaces
DeepSpeed's division by the accumulation steps; the world factor undoes its average over ranks),
and calls `engine.step()` once per optimizer step, where DeepSpeed clips (`gradient_clipping`),
updates and steps the schedule.

The DeepSpeed JSON is generated from our config (`deepspeed_config`): precision, micro-batch,
accumulation, ZeRO stage, offload, and bucket sizes made for a frozen base: only the adapters and
the projection have gradients, so the reduce buckets are a quarter of the trainable parameters
(the default 5e8 elements would put every gradient of a LoRA run in one bucket and overlap
nothing); under ZeRO-3 the adapters stay whole on every rank (the persistence threshold is their
largest tensor) and the prefetch bucket is one decoder layer. Gradients are reduced in fp32, as
FSDP2's `reduce_dtype`. `train.deepspeed_config` names a user JSON whose keys override ours, except
keys that would contradict our config (batch sizes, precision, stage, offload, clipping,
optimizer, scheduler): those are an error that names the file, the key and the option to set.

Checkpoints: the engine's own files (ZeRO partitions of the fp32 weights and optimizer state,
engine and scheduler state, frozen weights excluded) go to `trainer_state/deepspeed/state/` inside
our atomic folder; the PEFT adapter and projection are exported from the full fp32 master weights
(`safe_get_full_fp32_param`). A checkpoint written at another world size is converted once to
DeepSpeed's universal format (`trainer_state/deepspeed/state_universal/`, written to a temporary
folder and renamed) and loaded with `checkpoint.load_universal`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pefomed.engine import checkpoint, distributed
from pefomed.engine.config import Config, ConfigError
from pefomed.engine.lora import adapter_modules
from pefomed.engine.trainer import WarmupCosine, param_groups
from pefomed.models.loading import CheckpointError

logger = logging.getLogger(__name__)

STATE_TAG = "state"
UNIVERSAL_TAG = "state_universal"
WRAPPED = "_checkpoint_wrapped_module."
MAX_BUCKET = 500_000_000  # DeepSpeed's default bucket, elements

# Keys of the generated JSON that carry our config, and the option a user sets instead.
OWNED_KEYS: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "train_batch_size": "train.micro_batch_size x train.grad_accum x the world size",
    "gradient_clipping": "optim.grad_clip",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "zero_optimization.stage": "train.deepspeed_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "checkpoint.load_universal": "nothing: pefomed loads a universal checkpoint when the world size changes",
}
# Sections a user JSON may not hold at all: the engine would replace our optimizer or schedule.
REFUSED_SECTIONS: dict[str, str] = {
    "optimizer": "optim.lr, optim.betas, optim.eps and optim.weight_decay (pefomed's AdamW and its parameter groups)",
    "scheduler": "optim.lr, optim.min_lr and optim.warmup_steps (pefomed's warmup + cosine)",
}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def bucket_sizes(model: nn.Module) -> dict[str, int]:
    """Buckets for a frozen-base PEFT model (see the module docstring), in elements."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(_numel(p) for p in trainable)
    largest = max((_numel(p) for p in trainable), default=1)
    reduce = min(MAX_BUCKET, max(largest, math.ceil(total / 4)))
    adapters = [_numel(p) for _, m in adapter_modules(model) for _, p in m.adapter_params()]
    layers = list(model.llm.model.layers)
    layer = max((sum(_numel(p) for p in layer.parameters()) for layer in layers), default=MAX_BUCKET // 10)
    return {
        "reduce_bucket_size": reduce,
        "allgather_bucket_size": reduce,
        "stage3_param_persistence_threshold": max(adapters, default=100_000),
        "stage3_prefetch_bucket_size": min(MAX_BUCKET, layer),
    }


def generated_config(cfg: Config, env: distributed.DistEnv, model: nn.Module, *, universal: bool = False) -> dict:
    """The DeepSpeed JSON that our config maps to."""
    t = cfg.train
    cuda = env.device.type == "cuda"
    half = cfg.model.dtype in ("bfloat16", "float16")
    buckets = bucket_sizes(model)
    zero: dict[str, Any] = {
        "stage": t.deepspeed_stage,
        "contiguous_gradients": True,
        "overlap_comm": cuda,  # side streams: CUDA only
        "reduce_scatter": True,
        "reduce_bucket_size": buckets["reduce_bucket_size"],
    }
    if t.deepspeed_stage == 2:
        zero["allgather_bucket_size"] = buckets["allgather_bucket_size"]
    else:
        zero["stage3_param_persistence_threshold"] = buckets["stage3_param_persistence_threshold"]
        zero["stage3_prefetch_bucket_size"] = buckets["stage3_prefetch_bucket_size"]
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # our exports gather the fp32 masters
    if t.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if t.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * env.world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own progress lines stay off
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }
    if half:
        ds["communication_data_type"] = "fp32"
    return ds


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value != "auto":  # transformers' convention: "auto" takes the value from the trainer
            merged[key] = copy.deepcopy(value)
    return merged


def read_user_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config={path}: cannot read it ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed_config={path}: the top level must be a JSON object")
    return data


def deepspeed_config(cfg: Config, env: distributed.DistEnv, model: nn.Module, *, universal: bool = False) -> dict:
    """`generated_config`, overridden by `train.deepspeed_config` where the user's keys do not
    contradict ours."""
    ours = generated_config(cfg, env, model, universal=universal)
    path = cfg.train.deepspeed_config
    if path is None:
        return ours
    user = read_user_config(path)
    for section, instead in REFUSED_SECTIONS.items():
        if section in user:
            raise ConfigError(
                f"train.deepspeed_config={path}: the '{section}' section would replace pefomed's; remove it and "
                f"set {instead}"
            )
    flat_ours, flat_user = _flatten(ours), _flatten(user)
    for key, option in OWNED_KEYS.items():
        if key not in flat_user or flat_user[key] == "auto":
            continue
        mine = flat_ours.get(key, "none" if key.endswith(".device") else None)
        theirs = flat_user[key]
        if theirs != mine and not (
            isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and float(mine) == float(theirs)
        ):
            raise ConfigError(
                f"train.deepspeed_config={path}: {key}={json.dumps(theirs)} contradicts the run config, which makes "
                f'it {json.dumps(mine)}; set {option} instead (or remove the key, or write "auto")'
            )
    merged = _merge(ours, user)
    changed = sorted(k for k, v in flat_user.items() if v != "auto" and flat_ours.get(k) != v)
    if changed and env.is_main:
        logger.info("%s overrides the generated DeepSpeed config at: %s", path, ", ".join(changed))
    return merged


def build_optimizer(model: nn.Module, cfg: Config, ds_config: dict) -> torch.optim.Optimizer:
    """Our AdamW groups; on the host (`DeepSpeedCPUAdam`, AdamW mode) when the optimizer is
    offloaded, unless the DeepSpeed JSON sets `zero_force_ds_cpu_optimizer: false` (torch's AdamW
    then steps on the host: slower, but it needs no compiled op)."""
    groups = param_groups(model, cfg.optim)
    o = cfg.optim
    if cfg.train.offload_optimizer == "cpu" and ds_config.get("zero_force_ds_cpu_optimizer", True):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:
            return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
        except Exception as e:  # noqa: BLE001 - the op's JIT build fails in many ways
            raise ConfigError(
                f"train.offload_optimizer=cpu needs DeepSpeed's CPU Adam op, which could not be built or loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install a C++ compiler and "
                "ninja, or prebuild it (DS_BUILD_CPU_ADAM=1 pip install deepspeed), or set train.offload_optimizer=none"
            ) from e
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def _saved_world_size(cfg: Config) -> int | None:
    """The world size of the checkpoint this run will resume from, if any."""
    if not cfg.train.resume:
        return None
    path = checkpoint.latest_checkpoint(cfg.train.output_dir)
    if path is None:
        return None
    return checkpoint.saved_world_size(path, checkpoint.read_progress(path))


class DeepSpeedRuntime:
    """DeepSpeed's engine as the trainer's `distributed.Runtime`."""

    def __init__(self, model: nn.Module, cfg: Config, env: distributed.DistEnv) -> None:
        import deepspeed

        # DeepSpeed's collectives call torch's older names; torch warns at every call otherwise.
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        saved = _saved_world_size(cfg)
        self.universal = saved is not None and saved != env.world_size
        self.ds_config = deepspeed_config(cfg, env, model, universal=self.universal)
        optimizer = build_optimizer(model, cfg, self.ds_config)
        engine, ds_optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: WarmupCosine(opt, cfg.optim, cfg.train.max_steps),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.engine, self.model, self.module = engine, engine, engine.module
        self.optimizer, self.scheduler = ds_optimizer, scheduler
        self.env = env
        self.grad_divisor = env.world_size  # ZeRO averages the gradients over ranks
        self.trainable = [(n.replace(WRAPPED, ""), p) for n, p in self.module.named_parameters() if p.requires_grad]
        if env.is_main:
            logger.info(
                "deepspeed: ZeRO-%d, %s, buckets %s", cfg.train.deepspeed_stage,
                type(ds_optimizer).__name__, json.dumps(self.ds_config["zero_optimization"]),
            )  # fmt: skip

    def close(self) -> None:
        """Let go of the model, so that it, the engine and the process groups its parameters name
        can be freed before the interpreter exits (see `distributed.shutdown_distributed`).

        `DeepSpeedEngine.destroy` removes the optimizer's hooks; ZeRO-3 (DeepSpeed 0.19) also keeps
        the model in its module-level forward stack and in an `lru_cache` keyed by submodule.
        """
        self.engine.destroy()
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

        getattr(parameter_offload, "FWD_MODULE_STACK", []).clear()
        coordinator = partitioned_param_coordinator.PartitionedParameterCoordinator
        release = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
        for cell in getattr(release, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()

    def set_boundary(self, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm)

    def set_schedule_step(self, step: int) -> None:
        self.scheduler.set_step(step)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # --- checkpoints -------------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.engine.save_checkpoint(
            str(folder / "deepspeed"), tag=STATE_TAG, client_state=client, save_latest=False,
            exclude_frozen_parameters=True,
        )  # fmt: skip

    def load_state(self, folder: Path, saved_world_size: int) -> None:
        root = folder / "deepspeed"
        if not (root / STATE_TAG).is_dir():
            raise CheckpointError(
                f"{root / STATE_TAG}: missing; this checkpoint was not written by train.strategy=deepspeed "
                "(resume it with the strategy that wrote it, see its config.yaml)"
            )
        tag = STATE_TAG
        if saved_world_size != self.env.world_size:
            if not self.universal:
                raise CheckpointError(
                    f"{folder.parent}: written at world size {saved_world_size}, but this engine was set up for "
                    "the same world size; resume from the run's latest checkpoint"
                )
            to_universal(root, self.env)
            tag = UNIVERSAL_TAG
        path, _ = self.engine.load_checkpoint(
            str(root), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{root / tag}: DeepSpeed found no checkpoint there; the checkpoint is damaged")

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """The fp32 master copies of the trainable parameters, whole (a collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().float().cpu() for name, p in self.trainable}


def to_universal(root: Path, env: distributed.DistEnv) -> Path:
    """`root/state` converted to DeepSpeed's universal checkpoint `root/state_universal` (once,
    by rank 0, written to a temporary folder and renamed); every rank calls this."""
    out = root / UNIVERSAL_TAG
    if env.is_main and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = root / (UNIVERSAL_TAG + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(root / STATE_TAG), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False,
        )  # fmt: skip
        logger.info("converting %s to a universal checkpoint for world size %d", root / STATE_TAG, env.world_size)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                ds_to_universal.main(args)
        except Exception as e:  # noqa: BLE001 - the converter raises assertion and value errors alike
            raise CheckpointError(
                f"{root / STATE_TAG}: DeepSpeed could not convert it to a universal checkpoint for a new world "
                f"size ({type(e).__name__}: {e}); resume with the world size that wrote it"
            ) from e
        os.replace(tmp, out)
    distributed.barrier()
    return out
