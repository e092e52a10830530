"""Atomic checkpoints that a restarted run resumes from, step for step.

Layout of `output_dir/checkpoints/step_N/`:
- `adapter_model.safetensors` + `adapter_config.json`: the LLM's LoRA adapter in PEFT's format.
- `projection.safetensors`: the connector (`llama_proj.weight`, `llama_proj.bias`).
- `vision.safetensors`: only when `model.train_vision` trains the ViT: its parameters, under the
  names of `models.vit.VisionTransformer`.
- `config.yaml`: the full resolved run config, self-contained: `model.projection_checkpoint` and
  `model.adapter_checkpoint` (where a stage-2 run started from) are cleared, since this folder's
  own adapter and projection supersede them; evaluation needs only this folder and the base
  weights. Where the run started from is kept in `progress.json` as `init_from`.
- `trainer_state/`: the strategy's state of the trainable parameters and the optimizer: under
  single, ddp and fsdp2 a `torch.distributed.checkpoint` (`dcp/`, sharded under FSDP2); under
  deepspeed the engine's own checkpoint (`deepspeed/`: ZeRO partitions of the fp32 weights and
  the optimizer, the engine and scheduler state). Beside it `progress.json` (step, world size,
  batch sizes, every rank's data position, counters, `init_from`) and `rng_rank{R}.pt` (each
  rank's random state).
- `COMPLETE`: written last, before the rename.

Every checkpoint is written to `step_N.tmp` and renamed once complete, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written "latest". A
folder without `COMPLETE`, or named `*.tmp`, is never resumed from or evaluated.

A checkpoint resumes at another world size when the data order can continue exactly
(`engine.batches.reshard_positions`: every rank stood at the same place in the global order and
the samples drawn divide by the new world size): DCP reshards the FSDP2 / DDP state, DeepSpeed
loads a universal checkpoint converted from its ZeRO files. Ranks without a saved random state
start a fresh one seeded by (seed, rank, step). Otherwise the resume is refused with a
`CheckpointError` that says why and how to go on; the data order never changes silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pefomed.engine import distributed
from pefomed.engine.batches import CannotReshard, reshard_positions
from pefomed.engine.config import Config, save_config
from pefomed.engine.lora import PEFT_PREFIX, peft_adapter_config, write_adapter_config
from pefomed.models.loading import CheckpointError, read_state_dict

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARK = "COMPLETE"
VISION_FILE = "vision.safetensors"  # a ViT that model.train_vision trained
# Fields that name files a run started from; a checkpoint's own weights supersede them.
START_FROM_FIELDS = ("projection_checkpoint", "adapter_checkpoint")
# progress.json's `data_order`: 2 is the one stream of `engine.batches` that every world size shares.
DATA_ORDER = 2


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest `step_N` that was completely written (temporary folders are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    done = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and p.is_dir() and (p / COMPLETE_MARK).is_file()
    ]
    return max(done)[1] if done else None


def require_complete(path: str | Path) -> Path:
    """`path` if it is a completely written checkpoint folder; a CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (expected output_dir/checkpoints/step_N)")
    if path.name.endswith(".tmp") or not (path / COMPLETE_MARK).is_file():
        done = latest_checkpoint(path.parent.parent) if path.parent.name == "checkpoints" else None
        hint = f"; the latest complete one is {done}" if done else ""
        raise CheckpointError(
            f"{path}: not a complete checkpoint (it has no {COMPLETE_MARK} file, or is a temporary "
            f"*.tmp folder): the run that wrote it was stopped mid-save. Use a complete step_N folder{hint}"
        )
    return path


def self_contained(config: Config) -> Config:
    """`config` with the start-from fields cleared: what a checkpoint's `config.yaml` holds."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **dict.fromkeys(START_FROM_FIELDS)))


def start_from(config: Config) -> dict[str, str]:
    """The files a run started from (`model.projection_checkpoint`, `model.adapter_checkpoint`)."""
    return {
        f"model.{name}": str(Path(value).resolve())
        for name in START_FROM_FIELDS
        if (value := getattr(config.model, name))
    }


def save_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The trainable parameters and the optimizer as a `torch.distributed.checkpoint` (every rank)."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))}
    state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder / "dcp"))


def load_dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read `save_dcp_state`'s files into `model` and `optimizer`, resharded to this world size."""
    if not (folder / "dcp").is_dir():
        raise CheckpointError(
            f"{folder / 'dcp'}: missing; this checkpoint was not written by train.strategy single, ddp or fsdp2 "
            "(a deepspeed checkpoint resumes with train.strategy=deepspeed)"
        )
    state = {
        "model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of the trainable parameters on the host, gathered on every rank (FSDP2, DDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, seq, gauss_next = state["python"]
    random.setstate((version, tuple(seq), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    *,
    config: Config,
    step: int,
    progress: dict,
    env: distributed.DistEnv,
    runtime=None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write `step_N` atomically; every rank must call this.

    `runtime` (a `distributed.Runtime`, or `model` and its torch `optimizer`) writes the
    trainable and optimizer state; `progress` (rank 0's) goes to `progress.json`, with the world
    size and batch sizes added.
    """
    runtime = runtime if runtime is not None else distributed.TorchCheckpointState(model, optimizer)
    root = checkpoints_dir(config.train.output_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "trainer_state").mkdir(parents=True)
    distributed.barrier()

    runtime.save_state(tmp / "trainer_state")
    torch.save(_rng_state(), tmp / "trainer_state" / f"rng_rank{env.rank}.pt")

    full = runtime.full_trainable_state()
    if env.is_main:
        _write_exports(tmp, full, config)
        saved = {
            **progress,
            "step": step,
            "world_size": env.world_size,
            "micro_batch_size": config.train.micro_batch_size,
            "grad_accum": config.train.grad_accum,
            "strategy": config.train.strategy,
            "data_order": DATA_ORDER,
        }
        (tmp / "trainer_state" / "progress.json").write_text(json.dumps(saved, indent=1))
    distributed.barrier()
    if env.is_main:
        (tmp / COMPLETE_MARK).write_text(str(step))
        # An older step_N (a new run over an old output_dir) is moved aside, not deleted first:
        # a crash in between leaves the previous complete checkpoint as the latest.
        old = root / f"step_{step}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        if old.exists():
            shutil.rmtree(old)
    distributed.barrier()
    return final


def _write_exports(folder: Path, full: dict[str, torch.Tensor], config: Config) -> None:
    adapter = {
        PEFT_PREFIX + name[len("llm.") :]: t.contiguous()
        for name, t in full.items()
        if name.startswith("llm.") and (".lora_A." in name or ".lora_B." in name)
    }
    projection, vision = _submodule_state(full, "connector."), _submodule_state(full, "vit.")
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_file(projection, str(folder / "projection.safetensors"), metadata={"format": "pt"})
    if vision:
        save_file(vision, str(folder / VISION_FILE), metadata={"format": "pt"})
    write_adapter_config(folder / "adapter_config.json", peft_adapter_config(config.lora, config.model.llm, adapter))
    save_config(self_contained(config), folder / "config.yaml")


def _submodule_state(full: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, named as the submodule names them."""
    return {name[len(prefix) :]: t.contiguous() for name, t in full.items() if name.startswith(prefix)}


def _fsync_dir(path: Path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def saved_world_size(path: Path, progress: dict) -> int:
    """The world size that wrote the checkpoint (older ones: the count of per-rank RNG files)."""
    if "world_size" in progress:
        return int(progress["world_size"])
    return len(list((path / "trainer_state").glob("rng_rank*.pt")))


def read_progress(path: Path) -> dict:
    file = path / "trainer_state" / "progress.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; {path} is not a pefomed training checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file}: not valid JSON ({e}); the checkpoint is damaged, resume from an earlier one"
        ) from e


def _refuse_world_size(path: Path, saved: int, world_size: int, why: str) -> CheckpointError:
    processes = "1 process" if world_size == 1 else f"{world_size} processes"
    return CheckpointError(
        f"{path} was written by a run of world size {saved} and this run has world size {world_size} "
        f"({processes}), and {why}. Resume with world size {saved} (torchrun --nproc_per_node={saved} on one "
        f"node), or start a new run in a new train.output_dir from this checkpoint's weights: "
        f"model.adapter_checkpoint={path} model.projection_checkpoint={path / 'projection.safetensors'}"
    )


def data_positions(
    path: Path, progress: dict, saved: int, env: distributed.DistEnv, n_samples: int | None
) -> list[int]:
    """Every rank's data position for this run: the saved ones, or resharded to a new world size."""
    positions = [int(p) for p in progress.get("data_positions") or [progress.get("data_position", 0)]]
    if "data_order" not in progress and n_samples is not None and n_samples % saved:
        raise CheckpointError(
            f"{path} was written before the data order became one stream for every world size, and with "
            f"{n_samples} samples over {saved} ranks its epochs end elsewhere: the run cannot continue in its "
            "order. Start a new run in a new train.output_dir from its weights: "
            f"model.adapter_checkpoint={path} model.projection_checkpoint={path / 'projection.safetensors'}"
        )
    if len(positions) != saved:
        raise _refuse_world_size(
            path, saved, env.world_size,
            f"its progress.json holds {len(positions)} data position(s) for {saved} ranks: it is damaged",
        )  # fmt: skip
    if saved == env.world_size:
        return positions
    try:
        return reshard_positions(positions, env.world_size)
    except CannotReshard as e:
        raise _refuse_world_size(path, saved, env.world_size, str(e)) from e


def load_checkpoint(
    path: Path,
    *,
    env: distributed.DistEnv,
    runtime=None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: Config | None = None,
    n_samples: int | None = None,
) -> dict:
    """Restore trainable parameters, optimizer and RNG; return the saved progress, whose
    `data_positions` are this run's (resharded when the world size changed).

    Refuses (CheckpointError) a folder that is not complete, and a world size the data order
    cannot be resharded to (see the module docstring).
    """
    path = require_complete(path)
    progress = read_progress(path)
    saved = saved_world_size(path, progress)
    positions = data_positions(path, progress, saved, env, n_samples)
    runtime = runtime if runtime is not None else distributed.TorchCheckpointState(model, optimizer)
    runtime.load_state(path / "trainer_state", saved)
    rng_file = path / "trainer_state" / f"rng_rank{env.rank}.pt"
    if env.rank < saved and not rng_file.exists():
        raise CheckpointError(f"{rng_file}: missing; the checkpoint is damaged, resume from an earlier one")
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        seed = (config.train.seed if config is not None else 0) * 1_000_003 + env.rank * 10_007 + int(progress["step"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    if saved != env.world_size:
        _log_reshard(path, progress, saved, env, config)
    return {**progress, "world_size": saved, "data_positions": positions}


def _log_reshard(path: Path, progress: dict, saved: int, env: distributed.DistEnv, config: Config | None) -> None:
    fresh = f"; ranks {saved}..{env.world_size - 1} start fresh random states" if env.world_size > saved else ""
    logger.info(
        "%s: written at world size %d, resumed at %d: the data order continues where all ranks stood%s",
        path, saved, env.world_size, fresh,
    )  # fmt: skip
    if config is None or "micro_batch_size" not in progress:
        return
    before = int(progress["micro_batch_size"]) * int(progress["grad_accum"]) * saved
    now = config.train.micro_batch_size * config.train.grad_accum * env.world_size
    if before != now:
        keep = before / (config.train.micro_batch_size * env.world_size)
        hint = f" (train.grad_accum={int(keep)} keeps it)" if keep == int(keep) else ""
        logger.warning(
            "the global batch changes from %d samples per step (at world size %d) to %d: the run goes on "
            "in the same data order, with a different batch%s",
            before, saved, now, hint,
        )  # fmt: skip


def read_exports(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A complete checkpoint's adapter and projection tensors (and a trained ViT's), read before
    any model is built, so that a missing or damaged file fails in a second, naming the file."""
    path = require_complete(path)
    for name in ("adapter_model.safetensors", "projection.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: missing; is {path} a pefomed checkpoint folder?")
    exports = {
        "adapter": read_state_dict(path / "adapter_model.safetensors"),
        "projection": read_state_dict(path / "projection.safetensors"),
    }
    if (path / VISION_FILE).exists():
        exports["vision"] = read_state_dict(path / VISION_FILE)
    return exports


def apply_exports(model: nn.Module, exports: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Put `read_exports`' tensors into the model's adapter and connector (and its ViT)."""
    from pefomed.engine.lora import load_adapter_state_dict

    load_adapter_state_dict(model.llm, exports["adapter"], str(path))
    parts = [("connector", "projection.safetensors", exports["projection"])]
    if "vision" in exports:
        parts.append(("vit", VISION_FILE, exports["vision"]))
    for module, file, state in parts:
        try:
            getattr(model, module).load_state_dict(state)
        except (RuntimeError, AttributeError) as e:
            raise CheckpointError(
                f"{path / file} does not match the model that the config builds ({e}); "
                f"evaluate with the config that trained it, {path / 'config.yaml'}"
            ) from e


def load_exports(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's adapter and projection (evaluation: no optimizer, no DCP)."""
    apply_exports(model, read_exports(path), path)
