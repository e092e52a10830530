"""Atomic checkpoints that a restarted run resumes from, step for step.

Layout of `output_dir/checkpoints/step_N/`:
- `adapter_model.safetensors` + `adapter_config.json`: the LLM's LoRA adapter in PEFT's format.
- `projection.safetensors`: the connector (`llama_proj.weight`, `llama_proj.bias`).
- `config.yaml`: the full resolved run config.
- `trainer_state/`: a `torch.distributed.checkpoint` of the trainable parameters and the
  optimizer (sharded under FSDP2), `progress.json` (step, sampler position, counters) and
  `rng_rank{R}.pt` (each rank's random state).

Every checkpoint is written to `step_N.tmp` and renamed once complete, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written "latest".
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pefomed.engine import distributed
from pefomed.engine.config import Config, save_config
from pefomed.engine.lora import PEFT_PREFIX, peft_adapter_config, write_adapter_config

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARK = "COMPLETE"


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
        if (m := STEP_DIR.match(p.name)) and (p / COMPLETE_MARK).exists()
    ]
    return max(done)[1] if done else None


def _full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable parameters, gathered on every rank."""
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
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    step: int,
    progress: dict,
    env: distributed.DistEnv,
) -> Path:
    """Write `step_N` atomically; every rank must call this."""
    root = checkpoints_dir(config.train.output_dir)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "trainer_state").mkdir(parents=True)
    distributed.barrier()

    trainable = {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))}
    trainable["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(trainable, checkpoint_id=str(tmp / "trainer_state" / "dcp"))
    torch.save(_rng_state(), tmp / "trainer_state" / f"rng_rank{env.rank}.pt")

    full = _full_trainable_state(model)
    if env.is_main:
        _write_exports(tmp, full, config)
        (tmp / "trainer_state" / "progress.json").write_text(json.dumps({"step": step, **progress}))
    distributed.barrier()
    if env.is_main:
        (tmp / COMPLETE_MARK).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    distributed.barrier()
    return final


def _write_exports(folder: Path, full: dict[str, torch.Tensor], config: Config) -> None:
    adapter = {
        PEFT_PREFIX + name[len("llm.") :]: t.contiguous()
        for name, t in full.items()
        if name.startswith("llm.") and (".lora_A." in name or ".lora_B." in name)
    }
    projection = {
        name[len("connector.") :]: t.contiguous() for name, t in full.items() if name.startswith("connector.")
    }
    save_file(adapter, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_file(projection, str(folder / "projection.safetensors"), metadata={"format": "pt"})
    write_adapter_config(folder / "adapter_config.json", peft_adapter_config(config.lora, config.model.llm, adapter))
    save_config(config, folder / "config.yaml")


def _fsync_dir(path: Path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, env: distributed.DistEnv
) -> dict:
    """Restore trainable parameters, optimizer and RNG; return the saved progress."""
    state = {
        "model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "trainer_state" / "dcp"))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / "trainer_state" / f"rng_rank{env.rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(
            f"{rng_file}: no random state for rank {env.rank}; the checkpoint was written by a run "
            "with fewer processes. Resume with the same --nproc_per_node."
        )
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "trainer_state" / "progress.json").read_text())


def load_exports(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's adapter and projection (evaluation: no optimizer, no DCP)."""
    from pefomed.engine.lora import load_adapter_state_dict

    for name in ("adapter_model.safetensors", "projection.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path / name}: missing; is {path} a pefomed checkpoint folder?")
    load_adapter_state_dict(model.llm, load_file(str(path / "adapter_model.safetensors")), str(path))
    projection = load_file(str(path / "projection.safetensors"))
    try:
        model.connector.load_state_dict(projection)
    except RuntimeError as e:
        raise ValueError(f"{path / 'projection.safetensors'} does not match the model config: {e}") from e
