"""Reading checkpoints safely and assigning them into models built on the meta device.

Formats: a `.safetensors` file; a `.pth`/`.bin`/`.pt` file read with
`torch.load(weights_only=True, mmap=True)` (never arbitrary unpickling; LAVIS's `{"model": sd}`
wrapper is unwrapped); or a folder holding `model.safetensors`, a sharded
`model.safetensors.index.json`, `pytorch_model.bin` or its index. Tensors are assigned one by
one (`assign=True` semantics), so a model built on the meta device is never held twice.

A module may take charge of how its tensors are stored: when the module that owns a parameter
defines `convert_loaded(leaf_name, tensor) -> tensor`, each checkpoint tensor passes through it
(after the dtype and device cast) before it is assigned. A layer that keeps its weight quantized
quantizes it there, one tensor at a time.

After loading, every module that defines `reset_buffers()` is asked to recompute its
non-persistent buffers (RoPE's `inv_freq`), which a checkpoint does not hold and which a meta
build leaves without storage.

A file that cannot be read (truncated, corrupt, not a checkpoint at all, a shard named by the
index but absent) is a `CheckpointError` that names the file; a missing file is also a
`FileNotFoundError`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pefomed.errors import UserError

TORCH_SUFFIXES = (".pth", ".bin", ".pt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("model", "state_dict", "module")
MAX_NAMES_SHOWN = 8

Rename = Callable[[str], "str | None"]
ShapeHint = Callable[[str, tuple[int, ...], tuple[int, ...]], "str | None"]


class CheckpointError(UserError, ValueError):
    """A checkpoint file or folder that cannot be used as it is: it does not fit the model, is
    damaged, or is an incomplete training checkpoint. The message names the file, the key and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or shard that is not where the path (or the shard index) says."""


@dataclass
class LoadReport:
    """What `load_into` did not match (only non-empty when `strict=False`)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint path stands for, in load order; clear errors when there are none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file or folder")
    for index_name in INDEX_FILES:
        if (path / index_name).exists():
            return _shards_from_index(path / index_name)
    for name in SINGLE_FILES:
        if (path / name).exists():
            return [path / name]
    return [_only_weight_file(path)]


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index, no 'weight_map' ({e})") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise CheckpointNotFoundError(
            f"{index} names shard(s) that are missing from {index.parent}: {missing}; the download "
            "is incomplete, fetch those files again"
        )
    return shards


def _only_weight_file(folder: Path) -> Path:
    """A folder with one non-standard weight file (open_clip's `open_clip_pytorch_model.bin`)."""
    candidates = sorted(
        p for p in folder.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES)
        and not p.name.startswith(("adapter_", "optimizer", "training_args"))
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointNotFoundError(
            f"{folder}: no weights found; expected model.safetensors, "
            "model.safetensors.index.json (+ shards), pytorch_model.bin, or one .safetensors/.pth/.bin file"
        )
    raise CheckpointError(
        f"{folder}: several weight files and no index ({[p.name for p in candidates]}); "
        "pass the path of the one file to load"
    )


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
    # Not a zip archive: the legacy torch.save format (no mmap), or not a torch file at all.
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = _torch_load(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: missing ({e.strerror}); fetch the file again") from e
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise _unreadable(path, e) from e
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True): it holds objects other than "
            f"tensors ({found.group(1)}); convert it to safetensors, or re-save it as a plain "
            "state dict of tensors"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        raise _unreadable(path, e) from e
    # LAVIS / MiniGPT-v2 files hold {"model": state_dict, ...}; some trainers use "state_dict".
    if isinstance(data, dict) and not any(torch.is_tensor(v) for v in data.values()):
        for key in WRAPPER_KEYS:
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not any(torch.is_tensor(v) for v in data.values()):
        found = type(data).__name__ if not isinstance(data, dict) else f"a dict with keys {list(data)[:8]}"
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {found}")
    return {k: v for k, v in data.items() if torch.is_tensor(v)}


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = unpickler.group(1).strip() if unpickler else (text.splitlines()[0] if text else type(error).__name__)
    detail = detail.split(". ")[0]  # the first sentence: torch's zip-reader errors run on for lines
    return CheckpointError(
        f"{path}: not a readable checkpoint, the file is truncated or corrupt ({detail}); "
        "download or copy it again"
    )


def _iter_safetensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(str(shard), framework="pt", device="cpu")
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{shard}: missing ({e.strerror}); fetch the file again") from e
    except (SafetensorError, OSError) as e:
        raise _unreadable(shard, e) from e
    with handle as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise _unreadable(shard, e) from e
            yield name, tensor


def iter_state_dict(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one shard at a time, each tensor read only when it is reached."""
    for shard in checkpoint_files(path):
        if shard.suffix == ".safetensors":
            yield from _iter_safetensors(shard)
        elif shard.suffix in TORCH_SUFFIXES:
            yield from _read_torch_file(shard).items()
        else:
            raise CheckpointError(
                f"{shard}: unknown checkpoint format (expected .safetensors, .pth, .bin or .pt)"
            )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole checkpoint as one dict (for small models and for rename tables)."""
    return dict(iter_state_dict(path))


# ---------------------------------------------------------------- assigning


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    rename: Rename | None = None,
    ignore: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
    source: str = "<state dict>",
    shape_hint: ShapeHint | None = None,
) -> LoadReport:
    """Assign checkpoint tensors to `model`'s parameters and persistent buffers.

    `rename` maps a checkpoint key to the model's name (None drops it). `ignore` holds regexes
    of checkpoint keys to drop silently; `allow_missing` regexes of model names that may stay
    unfilled (parameters the caller initializes itself, which the checkpoint does not have). Float tensors are cast to
    `dtype` when given, otherwise to the dtype of a model tensor that is already materialized.
    `shape_hint(name, checkpoint_shape, model_shape)` (default: `model.shape_mismatch_hint`)
    explains a mismatch in terms of the model's config. Tied parameters stay tied. The module
    owning a tensor may convert it on arrival (`convert_loaded`, see the module docstring).
    """
    targets = _load_targets(model)
    ignore_re = [re.compile(p) for p in ignore]
    allowed_missing_re = [re.compile(p) for p in allow_missing]
    hint = shape_hint or getattr(model, "shape_mismatch_hint", None)
    items = state.items() if isinstance(state, dict) else state
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    first_device: torch.device | None = None
    for key, tensor in items:
        name = rename(key) if rename else key
        if name is None or any(r.search(key) for r in ignore_re):
            continue
        if name not in targets:
            unexpected.append(key)
            continue
        current = targets[name].tensor
        if tuple(current.shape) != tuple(tensor.shape):
            mismatched.append(_describe_mismatch(key, name, tuple(tensor.shape), tuple(current.shape), hint))
            continue
        tensor = _converted(tensor, current, dtype, device)
        first_device = first_device or tensor.device
        tensor = _owner_conversion(model, name, tensor)
        _assign(model, targets[name], tensor)
        loaded.update(targets[name].aliases)
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensor(s) have the wrong shape for this model:\n  "
            + "\n  ".join(mismatched[:MAX_NAMES_SHOWN])
            + ("\n  ..." if len(mismatched) > MAX_NAMES_SHOWN else "")
        )
    missing = [
        name for name, target in targets.items()
        if name == target.aliases[0] and not loaded.intersection(target.aliases)
        and not any(r.search(name) for r in allowed_missing_re)
    ]
    if strict:
        _raise_on_unmatched(source, missing, unexpected)
    _materialize_non_persistent_buffers(model, device if device is not None else first_device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return LoadReport(missing, unexpected)


@dataclass
class _Target:
    tensor: torch.Tensor
    is_parameter: bool
    aliases: list[str]  # every name under which this tensor is registered (tied weights)


def _load_targets(model: nn.Module) -> dict[str, _Target]:
    """Parameters and persistent buffers by name; tied names share one `_Target`."""
    by_identity: dict[int, _Target] = {}
    targets: dict[str, _Target] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        target = by_identity.setdefault(id(p), _Target(p, True, []))
        target.aliases.append(name)
        targets[name] = target
    for name, b in model.named_buffers(remove_duplicate=False):
        if not _is_non_persistent(model, name):
            target = by_identity.setdefault(id(b), _Target(b, False, []))
            target.aliases.append(name)
            targets[name] = target
    return targets


def _converted(
    tensor: torch.Tensor, current: torch.Tensor, dtype: torch.dtype | None, device
) -> torch.Tensor:
    if tensor.is_floating_point():
        if dtype is None and current.is_floating_point() and not current.is_meta:
            dtype = current.dtype
    else:
        dtype = None  # integer buffers (position ids, quant codes) keep their dtype
    return tensor.to(device=device, dtype=dtype)


def _owner_conversion(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    convert = getattr(owner, "convert_loaded", None)
    return convert(leaf, tensor) if convert is not None else tensor


def _describe_mismatch(key: str, name: str, got: tuple, want: tuple, hint: ShapeHint | None) -> str:
    renamed = f" (the model's {name})" if name != key else ""
    line = f"{key} is {list(got)} in the checkpoint but {list(want)} in the model{renamed}"
    explanation = hint(name, got, want) if hint else None
    return f"{line}: {explanation}" if explanation else (
        f"{line}: the model's config does not match this checkpoint"
    )


def _raise_on_unmatched(source: str, missing: list[str], unexpected: list[str]) -> None:
    problems = []
    if missing:
        problems.append(
            f"missing from the checkpoint {_shown(missing)}; check that the "
            "config (number of layers, tied embeddings, biases) matches the checkpoint"
        )
    if unexpected:
        problems.append(
            f"in the checkpoint but not in the model {_shown(unexpected)}; "
            "check the config, or pass ignore=[regex] for keys that are meant to be dropped"
        )
    if problems:
        raise CheckpointError(f"{source}: checkpoint and model disagree: " + "; ".join(problems))


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else ""
    return f"{names[:MAX_NAMES_SHOWN]}{more}"


def _assign(model: nn.Module, target: _Target, tensor: torch.Tensor) -> None:
    """Register `tensor` under every alias of `target`, as one object so that ties survive."""
    if target.is_parameter:
        tensor = nn.Parameter(tensor, requires_grad=target.tensor.requires_grad)
    for name in target.aliases:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        (owner._parameters if target.is_parameter else owner._buffers)[leaf] = tensor


def _is_non_persistent(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf in getattr(owner, "_non_persistent_buffers_set", ())


def _materialize_non_persistent_buffers(model: nn.Module, device) -> None:
    """Give meta non-persistent buffers storage on the weights' device, for `reset_buffers`."""
    device = device if device is not None else "cpu"
    for module in model.modules():
        for leaf in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(leaf)
            if buf is not None and buf.is_meta:
                module._buffers[leaf] = torch.empty_like(buf, device=device)


def meta_tensor_names(model: nn.Module, allow: Iterable[str] = ()) -> list[str]:
    """Parameters and buffers that still have no storage, except names matching `allow` regexes."""
    allowed = [re.compile(p) for p in allow]
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_meta and not any(r.search(name) for r in allowed)]


def materialize_meta(model: nn.Module, device: torch.device | str, init: Callable[[nn.Module], None]) -> None:
    """Give parameters still on the meta device real storage, then let `init` fill them."""
    for module in model.modules():
        touched = False
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                module._parameters[name] = nn.Parameter(
                    torch.empty_like(p, device=device), requires_grad=p.requires_grad
                )
                touched = True
        if touched:
            init(module)
