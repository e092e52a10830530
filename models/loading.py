"""Reading checkpoints safely and assigning them into models built on the meta device.

Formats: a `.safetensors` file, a folder with `model.safetensors` or a sharded
`model.safetensors.index.json`, and `.pth`/`.bin`/`.pt` files read with
`torch.load(weights_only=True)` (never arbitrary unpickling). Tensors are assigned shard by
shard (`assign=True`), so the host never holds the model twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

TORCH_SUFFIXES = (".pth", ".bin", ".pt")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, with the file, the key and the fix."""


def _shard_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            shards = [path / name for name in sorted(set(weight_map.values()))]
            missing = [str(s) for s in shards if not s.exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
            return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        return [path / n for n in found]
    raise FileNotFoundError(
        f"{path}: no model.safetensors, sharded index, or pytorch_model.bin in this folder"
    )


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({e}); convert it to "
            "safetensors, or re-save it as a plain state dict of tensors"
        ) from e
    # LAVIS / MiniGPT-v2 files hold {"model": state_dict}; some trainers use "state_dict".
    if isinstance(data, dict) and not any(torch.is_tensor(v) for v in data.values()):
        for key in ("model", "state_dict", "module"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    return {k: v for k, v in data.items() if torch.is_tensor(v)}


def iter_state_dict(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one shard at a time."""
    for shard in _shard_files(Path(path)):
        if shard.suffix == ".safetensors":
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        elif shard.suffix in TORCH_SUFFIXES:
            yield from _read_torch_file(shard).items()
        else:
            raise CheckpointError(f"{shard}: unknown checkpoint format (expected .safetensors, .pth, .bin)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return dict(iter_state_dict(path))


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    source: str = "<state dict>",
) -> list[str]:
    """Assign checkpoint tensors to `model`'s parameters and buffers; return the keys not found.

    `rename` maps a checkpoint key to the model's name (None drops it). `ignore` holds regexes
    of checkpoint keys to drop silently; `allow_missing` regexes of model keys that may stay
    unfilled (LoRA adapters, which the base checkpoint does not have).
    """
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    ignore_re = [re.compile(p) for p in ignore]
    allowed_missing = [re.compile(p) for p in allow_missing]
    items = state.items() if isinstance(state, dict) else state
    loaded, unexpected = set(), []
    for key, tensor in items:
        name = rename(key) if rename else key
        if name is None or any(r.search(key) for r in ignore_re):
            continue
        if name not in targets:
            unexpected.append(key)
            continue
        current = targets[name]
        if tuple(current.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {list(tensor.shape)} but the model's {name} is "
                f"{list(current.shape)}; the model config does not match this checkpoint "
                "(check hidden sizes, vocab_size, image_size / patch size)"
            )
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        elif tensor.is_floating_point() and current.is_floating_point() and not current.is_meta:
            tensor = tensor.to(current.dtype)
        if device is not None:
            tensor = tensor.to(device)
        _assign(model, name, tensor, isinstance(current, nn.Parameter))
        loaded.add(name)
    missing = [
        n for n in targets if n not in loaded and not any(r.search(n) for r in allowed_missing)
        and not _is_non_persistent(model, n)
    ]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: checkpoint and model disagree: missing from the checkpoint "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; not in the model "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Check that the config "
            "(layers, layout) matches the checkpoint."
        )
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return missing


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if is_param:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = tensor


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf in getattr(owner, "_non_persistent_buffers_set", ())


def materialize_meta(model: nn.Module, device: torch.device | str, init: Callable[[nn.Module], None]) -> None:
    """Give parameters still on the meta device real storage, then let `init` fill them."""
    for module in model.modules():
        touched = False
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                touched = True
        if touched:
            init(module)
