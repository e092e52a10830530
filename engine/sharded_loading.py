"""FSDP2 in torchtitan's order: build on the meta device, shard, then load each rank's rows.

`build_sharded_model(cfg, env)` builds the model of `cfg` on the meta device
(`engine.build.build_model(cfg, "meta")`: every shape, the trainable set and the dtypes, no
storage), applies activation checkpointing when asked and `fully_shard` (the ViT as one unit,
the embeddings, each decoder layer, norm + head, then the root: `distributed.fully_shard_model`),
gives each rank storage for its own shards only (`to_empty`), and fills them:

- Weights that come from files are read by every rank, its rows only. The LLM's safetensors are
  read row range by row range with `pread` straight into the rank's buffer (no memory map, so the
  file's pages never count in the rank's memory), and a rank never reads another rank's rows;
  `.bin` files are memory-mapped and sliced. The vision
  checkpoint streams through its layout's rename table (`models.vit.LAYOUTS`) one tensor at a time.
  No rank ever holds the full model: the peak is its shards plus one tensor of the vision file.
- What `build_model` initializes at random (fresh adapters, the projection, a ViT without a
  checkpoint) is drawn exactly as `build_model` draws it (same seed, same order, same device and
  dtype), whole, one tensor at a time, and each rank keeps its rows, so FSDP2 starts from the same
  weights as the single process. `model.projection_checkpoint` and `model.adapter_checkpoint`
  then overwrite their parts, again by rows.
- A model that is random from end to end (`model.random_init: true`, the demo and the tests) is
  built once, whole, by rank 0 with `build_model`, and sent to the other ranks one tensor at a
  time, each rank keeping its rows: only rank 0 ever holds a full copy, of a model that has no
  weights files.

FSDP2 shards dim 0 as `torch.chunk` does (ceil(n / world) rows per rank, the last ranks fewer or
none), which is the row range each rank reads. Buffers are not sharded: non-persistent ones are
recomputed (`reset_buffers`), persistent ones read whole.

QLoRA (`model.quantize_llm: nf4`): every frozen weight that the whole build quantizes is an
`NF4Tensor` on the meta device too (`quantize_on_meta`, through the modules' own `convert_loaded`
hook), so FSDP2 cuts it as it cuts the whole build's (`torch.chunk` along dim 0, in whole
quantization blocks, see `kernels.nf4._split`) and `to_empty` gives each rank NF4 storage for its
rows only. Each rank then reads only its rows of the dense weight, a bounded block of rows at a
time, and quantizes them (`quantize_rows`: the 64-value blocks' codes and absmax depend on their
own values only). Double quantization is not local: its offset is the mean of the whole weight's
absmax and its 8-bit codes come in groups of 256 blocks that may straddle ranks, so the ranks
all-gather the absmax vector (1/64 of the weight's elements, in fp32) and each double-quantizes
all of it as `to_nf4` does (`nf4_shard`). The shard is cut from that weight with `torch.chunk`, as
FSDP2 cuts the whole build's: the same packed codes, absmax and nested state, bit for bit. No rank
reads another rank's rows or holds a dense weight: the transient memory is one block of rows. A
random-init QLoRA model is quantized whole by rank 0, which sends each NF4 weight's codes and state
as they are.

`model.arch: idefics2` follows the same steps: its one Hugging Face folder (SigLIP, connector, text
model, head) is read row range by row range under the names `llm.*`, and its adapters (text model
and connector) are drawn as `build_idefics2` draws them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import types
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pefomed.engine import distributed
from pefomed.engine.build import DTYPES, build_connector, build_model, build_vision
from pefomed.engine.config import Config, ConfigError
from pefomed.engine.lora import PEFT_PREFIX, LoRALinear, adapter_modules
from pefomed.engine.ops import kernel_ops
from pefomed.kernels.nf4 import NF4Tensor, _quantize_blockwise_8bit, dynamic_map_signed, to_nf4
from pefomed.models import vit
from pefomed.models.loading import CheckpointError, checkpoint_files, iter_state_dict

logger = logging.getLogger(__name__)

WRAPPED = "_checkpoint_wrapped_module."
READ_BLOCK_BYTES = 16 * 2**20  # rows read per block (counted at 4 bytes an element)
# Rows quantized per block: quantizing holds a few fp32 temporaries of the block, so a smaller one.
NF4_BLOCK_BYTES = 4 * 2**20
Reader = Callable[[int, int], torch.Tensor]  # (start row, stop row) -> those rows of the full tensor


def supports_sharded_loading(cfg: Config) -> str | None:
    """None when `build_sharded_model` can build `cfg`; otherwise why not."""
    if getattr(cfg.model, "arch", "minigptv2") not in ("minigptv2", "llava", "idefics2"):
        return f"model.arch={cfg.model.arch}"
    if cfg.model.quantize_llm not in ("none", "nf4"):
        return f"model.quantize_llm={cfg.model.quantize_llm}"
    if cfg.model.train_vision:
        return "model.train_vision=true (a trained ViT)"
    return None


def row_range(n_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows of a dim-0 FSDP2 shard: `torch.chunk` sizes, ceil(n / world) per rank."""
    chunk = math.ceil(n_rows / world_size) if n_rows else 0
    start = min(rank * chunk, n_rows)
    return start, min(start + chunk, n_rows)


class ShardedTargets:
    """The sharded model's parameters and buffers by their checkpoint names (wrappers stripped,
    tied names aliased), and which of them have been filled."""

    def __init__(
        self, model: nn.Module, env: distributed.DistEnv, dtype: torch.dtype, nf4: dict[str, NF4Tensor] | None = None
    ) -> None:
        self.env, self.dtype = env, dtype
        self.nf4 = nf4 or {}  # the whole NF4 weights on meta, by name: their layout (`quantize_on_meta`)
        # The adapters in build_model's order (`init_fresh_adapters`), and how each is initialized.
        self.adapters = [(name.replace(WRAPPED, ""), module.init) for name, module in adapter_modules(model)]
        self.tensors: dict[str, torch.Tensor] = {}
        self.canonical: dict[str, str] = {}
        seen: dict[int, str] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            clean = name.replace(WRAPPED, "")
            first = seen.setdefault(id(t), clean)
            self.canonical[clean] = first
            self.tensors.setdefault(first, t)
        self.non_persistent = {
            f"{prefix}.{leaf}" if prefix else leaf
            for prefix, module in model.named_modules()
            for leaf in getattr(module, "_non_persistent_buffers_set", ())
        }
        self.non_persistent = {n.replace(WRAPPED, "") for n in self.non_persistent}
        self.filled: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.canonical

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[self.canonical[name]].shape)

    def local_rows(self, name: str) -> tuple[torch.Tensor, int, int]:
        """This rank's storage of `name` and the global rows it holds."""
        t = self.tensors[self.canonical[name]]
        local = t.to_local() if hasattr(t, "to_local") else t
        if local is t or t.ndim == 0:  # not sharded (buffers, or a root without shards)
            return local, 0, t.shape[0] if t.ndim else 0
        mesh = t.device_mesh
        start, stop = row_range(t.shape[0], mesh.size(), mesh.get_local_rank())
        if local.shape[0] != stop - start:
            raise RuntimeError(f"{name}: FSDP2 holds {local.shape[0]} rows here, expected rows {start}:{stop}")
        return local, start, stop

    @torch.no_grad()
    def fill(self, name: str, read: Reader, full_shape: tuple[int, ...], source: str) -> None:
        """Copy this rank's rows of `name` from `read`; `full_shape` is the checkpoint tensor's."""
        canonical = self.canonical[name]
        if canonical in self.filled:
            return  # a tied alias that the checkpoint also stores
        want = self.shape(name)
        if tuple(full_shape) != want:
            raise CheckpointError(
                f"{source}: {name} is {list(full_shape)} in the checkpoint but {list(want)} in the model the config "
                "builds; check the model config against the checkpoint"
            )
        local, start, stop = self.local_rows(name)
        if canonical in self.nf4:
            self._fill_nf4(canonical, read, local, start, stop)
        elif local.ndim == 0:
            local.copy_(self._as_built(read(0, 0), local).reshape(()))
        else:
            # A bounded block of rows at a time: the transient memory is one block, not a tensor.
            step = max(1, READ_BLOCK_BYTES // max(local[:1].numel() * 4, 1))
            for a in range(start, stop, step):
                b = min(a + step, stop)
                local[a - start : b - start].copy_(self._as_built(read(a, b), local))
        self.filled.add(canonical)

    def _fill_nf4(self, name: str, read: Reader, local: NF4Tensor, start: int, stop: int) -> None:
        """This rank's NF4 shard of `name`: its rows quantized here, the double quantization over
        the whole weight's absmax (all-gathered), cut as FSDP2 cuts the whole build's weight."""
        layout = self.nf4[name]
        own = quantize_rows(read, layout, start, stop, local.device)
        mesh = self.tensors[name].device_mesh if hasattr(self.tensors[name], "device_mesh") else None
        world, rank = (mesh.size(), mesh.get_local_rank()) if mesh is not None else (1, 0)
        absmax = None
        if layout.nested:
            absmax = own.absmax
            if world > 1:  # every rank holds as many blocks (`check_nf4_sharding`)
                parts = [torch.empty_like(absmax) for _ in range(world)]
                dist.all_gather(parts, absmax.contiguous(), group=mesh.get_group())
                absmax = torch.cat(parts)
        local.copy_(nf4_shard(layout, own, absmax, start, world, rank))

    def _as_built(self, rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """build_model casts every part to model.dtype before it lifts the trained ones to fp32;
        a frozen weight in model.dtype gets that one rounding from `copy_` itself."""
        rows = rows.to(local.device)
        if rows.is_floating_point() and local.dtype != self.dtype:
            rows = rows.to(self.dtype)
        return rows

    def missing(self, prefix: str = "") -> list[str]:
        return [
            n for n in self.tensors
            if n.startswith(prefix) and n not in self.filled and n not in self.non_persistent
        ]  # fmt: skip


# ---------------------------------------------------------------- NF4 (QLoRA)


def quantize_on_meta(model: nn.Module) -> dict[str, NF4Tensor]:
    """Store every weight that the whole build quantizes as an `NF4Tensor` on the meta device.

    A layer built on meta holds its frozen weight dense (nothing to quantize yet); the whole
    build quantizes it when the loader assigns it, through the layer's `convert_loaded` hook. The
    same hook applied to the meta weight gives the layout the whole build ends with (blocksize,
    double quantization, dtype), so that `fully_shard` and `to_empty` give each rank NF4 storage
    for exactly the shard FSDP2 cuts from the whole build's weight. Returns those weights by name.
    """
    quantized: dict[str, NF4Tensor] = {}
    for prefix, module in model.named_modules():
        convert = getattr(module, "convert_loaded", None)
        if convert is None:
            continue
        for leaf, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            stored = convert(leaf, param.detach())
            if isinstance(stored, NF4Tensor):
                setattr(module, leaf, nn.Parameter(stored, requires_grad=False))
                quantized[f"{prefix}.{leaf}" if prefix else leaf] = stored
    return quantized


def check_nf4_sharding(quantized: dict[str, NF4Tensor], world_size: int) -> None:
    """FSDP2 shards an NF4 weight by whole rows that are whole quantization blocks, evenly (an NF4
    shard cannot be padded, see `NF4Tensor.fsdp_pre_all_gather`): say so before anything is read."""
    for name, q in quantized.items():
        rows = q.shape[0]
        row = q.numel() // rows
        if rows % world_size or (rows // world_size * row) % q.blocksize:
            raise ConfigError(
                f"train.strategy=fsdp2 with model.quantize_llm=nf4 on {world_size} ranks: {name} {list(q.shape)} "
                f"cannot be cut into {world_size} equal shards of whole {q.blocksize}-value NF4 blocks "
                f"({rows} rows of {row}); run on a number of ranks that divides {rows} (and leaves shards of "
                f"a multiple of {q.blocksize} values), or use train.strategy=ddp"
            )


def quantize_rows(read: Reader, layout: NF4Tensor, start: int, stop: int, device: torch.device) -> NF4Tensor:
    """Rows [start, stop) of the weight `layout` describes, NF4-quantized without double
    quantization, a bounded block of rows at a time.

    Each `blocksize`-value block's absmax and codes depend on its own values only, and every
    block of rows here starts on a block boundary (`start * row` does, `check_nf4_sharding`), so
    these are exactly the codes and absmax of those rows in `to_nf4(whole weight)`. The rows are
    rounded to the weight's dtype first, as the whole build's loader does before `convert_loaded`.
    """
    row = layout.numel() // layout.shape[0]
    step = max(1, NF4_BLOCK_BYTES // max(row * 4, 1))
    whole_blocks = layout.blocksize // math.gcd(row, layout.blocksize)  # rows that end on a block boundary
    step = max(whole_blocks, step - step % whole_blocks)
    packed, absmax = [], []
    for a in range(start, stop, step):
        b = min(a + step, stop)
        rows = read(a, b).to(device).to(layout.dtype)
        q = to_nf4(rows, layout.blocksize, double_quant=False)
        packed.append(q.packed)
        absmax.append(q.absmax)
        del rows, q
    shape = (stop - start, *layout.shape[1:])  # never empty: every rank holds rows (`check_nf4_sharding`)
    return NF4Tensor(torch.cat(packed), torch.cat(absmax), shape, layout.dtype, layout.blocksize)


def nf4_shard(
    layout: NF4Tensor, own: NF4Tensor, absmax: torch.Tensor | None, start: int, world: int, rank: int
) -> NF4Tensor:
    """This rank's FSDP2 shard of the NF4 weight, from its own rows' codes (`quantize_rows`).

    `absmax` is the whole weight's plain absmax (every rank's, in rank order) when the weight is
    double-quantized, None otherwise. It is double-quantized here exactly as `to_nf4` does it
    (offset = its mean, 8-bit codes per 256 blocks, on this device); the whole weight is then
    assembled with only this rank's packed codes written, and cut with `torch.chunk` as FSDP2 cuts
    a parameter, so the shard keeps the nested state or carries plain fp32 absmax exactly as the
    whole build's shard does (`kernels.nf4._split`). The other ranks' codes are never written
    here: their pieces are cut too and dropped.
    """
    device = own.packed.device
    n, bs = layout.numel(), layout.blocksize
    first = start * (n // layout.shape[0])  # on a block boundary, so on a byte boundary
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    packed[first // 2 : first // 2 + own.packed.shape[0]] = own.packed
    nested: dict[str, torch.Tensor | None] = {"offset": None, "nested_absmax": None, "nested_code": None}
    if layout.nested:
        if absmax is None or absmax.numel() != -(n // -bs):
            raise ValueError(f"nf4_shard: double quantization needs the whole weight's {-(n // -bs)} absmax values")
        # `to_nf4`'s own double quantizer on the whole absmax: the same function, so the same codes
        # (tests/engine/test_fsdp_sharded_loading.py pins the shards against `to_nf4`'s).
        offset = absmax.mean()
        code = dynamic_map_signed().to(device)
        absmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, code, layout.nested_blocksize)
        nested = {"offset": offset, "nested_absmax": nested_absmax, "nested_code": code}
    else:
        blocks = own.absmax
        absmax = torch.empty(-(n // -bs), dtype=torch.float32, device=device)
        absmax[first // bs : first // bs + blocks.numel()] = blocks
    whole = NF4Tensor(
        packed, absmax, layout.shape, layout.dtype, bs, nested_blocksize=layout.nested_blocksize, **nested
    )
    return torch.chunk(whole, world, dim=0)[rank]


# ---------------------------------------------------------------- sources


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _safetensors_rows(path: Path, stack: ExitStack) -> Iterator[tuple[str, tuple[int, ...], Reader]]:
    """(key, shape, row reader) of one safetensors file, read with `pread` straight into each
    rank's buffer: no memory map, so the file's pages never count in this process's memory."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download or copy it again") from e
    header.pop("__metadata__", None)
    fd = os.open(path, os.O_RDONLY)
    stack.callback(os.close, fd)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: {key} has dtype {info['dtype']}, which the sharded loader does not read")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: {key}'s offsets do not match its shape {list(shape)}; the file is damaged")

        def read(start: int, stop: int, dtype=dtype, shape=shape, offset=8 + size + begin, row_bytes=row_bytes,
                 key=key):  # fmt: skip
            if not shape:
                out = torch.empty((), dtype=dtype)
                start, stop, row_bytes = 0, 1, dtype.itemsize
            else:
                out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
            view = memoryview(out.view(torch.uint8).numpy().reshape(-1))
            done, want, at = 0, (stop - start) * row_bytes, offset + start * row_bytes
            while done < want:
                got = os.preadv(fd, [view[done:want]], at + done)
                if got <= 0:
                    raise CheckpointError(f"{path}: ends inside {key}; the file is truncated, download it again")
                done += got
            return out

        yield key, shape, read


def llm_rows(folder: str, stack: ExitStack) -> Iterator[tuple[str, tuple[int, ...], Reader]]:
    """(key, shape, row reader) of a Hugging Face model folder, slicing in place."""
    for shard in checkpoint_files(folder):
        if shard.suffix == ".safetensors":
            yield from _safetensors_rows(shard, stack)
        else:  # .bin / .pth: memory-mapped by iter_state_dict's torch.load(mmap=True)
            for key, tensor in iter_state_dict(shard):
                yield key, tuple(tensor.shape), (lambda a, b, t=tensor: t if t.ndim == 0 else t[a:b])


def whole(tensor: torch.Tensor) -> Reader:
    return lambda a, b: tensor if tensor.ndim == 0 else tensor[a:b]


# ---------------------------------------------------------------- building


def build_sharded_model(cfg: Config, env: distributed.DistEnv, *, activation_checkpointing: bool = False) -> nn.Module:
    """The model of `cfg`, FSDP2-sharded over the ranks, no rank holding it whole (module doc)."""
    dtype = DTYPES[cfg.model.dtype]
    ops = kernel_ops(cfg.model.kernels, env.device)
    model = build_model(cfg, "meta", ops=ops)
    widths = (model.vit.config.hidden_size, model.llm.config.hidden_size)
    quantized = quantize_on_meta(model)
    if quantized:
        check_nf4_sharding(quantized, env.world_size)
        logger.info("QLoRA: %d NF4 weights, each rank quantizes its own rows", len(quantized))
    if activation_checkpointing:
        n = distributed.apply_activation_checkpointing(model)
        logger.info("activation checkpointing: %d blocks recompute their activations in backward", n)
    distributed.fully_shard_model(model, env, dtype)
    model.to_empty(device=env.device)
    targets = ShardedTargets(model, env, dtype, quantized)
    if cfg.model.random_init:
        _fill_from_rank0(cfg, env, targets, ops)
    else:
        _fill_from_files(cfg, env, targets, ops, widths)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    missing = targets.missing()
    if missing:
        raise CheckpointError(f"no values for {missing[:8]} after the sharded load (no checkpoint key, no init)")
    return model


@torch.no_grad()
def _fill_from_rank0(cfg: Config, env: distributed.DistEnv, targets: ShardedTargets, ops) -> None:
    """A random model: rank 0 builds it whole; one broadcast per tensor, each rank keeps its rows."""
    full = dict(_named_tensors(build_model(cfg, env.device, ops=ops))) if env.is_main else {}
    broadcast = dist.is_initialized() and dist.get_world_size() > 1
    for name in sorted(targets.tensors):
        if name in targets.non_persistent:
            continue
        shape, t = targets.shape(name), targets.tensors[name]
        local = t.to_local() if hasattr(t, "to_local") else t
        if name in targets.nf4:
            # The whole NF4 weight as rank 0 quantized it: its codes and state, sent as they are.
            box = full[name] if env.is_main else torch.empty_like(targets.nf4[name], device=env.device)
            for inner in box.__tensor_flatten__()[0] if broadcast else ():
                dist.broadcast(getattr(box, inner), src=0)
            local.copy_(torch.chunk(box, t.device_mesh.size(), dim=0)[t.device_mesh.get_local_rank()])
            targets.filled.add(name)
            continue
        box = full[name].to(local.dtype) if env.is_main else torch.empty(shape, dtype=local.dtype, device=env.device)
        if broadcast:
            dist.broadcast(box, src=0)
        targets.fill(name, whole(box), shape, "rank 0's random init")


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        yield name.replace(WRAPPED, ""), t


@torch.no_grad()
def _fill_from_files(
    cfg: Config, env: distributed.DistEnv, targets: ShardedTargets, ops, widths: tuple[int, int]
) -> None:
    m = cfg.model
    device, dtype = env.device, DTYPES[m.dtype]
    torch.manual_seed(cfg.train.seed)  # build_model's seed: the random parts are drawn as it draws them
    with ExitStack() as stack:
        for key, shape, read in llm_rows(m.llm, stack):
            if key.endswith("rotary_emb.inv_freq"):
                continue  # saved by old transformers versions; recomputed
            name = "llm." + key
            if name not in targets:
                raise CheckpointError(f"{m.llm}: {key} is in the checkpoint but not in the model the config builds")
            targets.fill(name, read, shape, m.llm)
    missing = [n for n in targets.missing("llm.") if ".lora_" not in n]
    if missing:
        raise CheckpointError(f"{m.llm}: missing from the checkpoint: {missing[:8]}; check that it matches model.llm")
    _init_adapters(targets, device, dtype)
    if m.arch == "idefics2":
        # One folder holds SigLIP, the connector and the text model (all under `llm.`, read above);
        # the connector trains through its adapters only, so nothing else is drawn.
        _start_from(cfg, targets)
        return
    if m.vision_checkpoint:
        tower = build_vision(cfg, torch.device("meta"), ops)  # shapes and config, for the layout's checks
        converted = vit.LAYOUTS[m.vision_layout](iter_state_dict(m.vision_checkpoint))
        for name, tensor in vit._fit(converted, tower, m.vision_checkpoint, m.vision_layout):
            if "vit." + name not in targets:
                raise CheckpointError(f"{m.vision_checkpoint}: {name} is not a parameter of the vision tower")
            targets.fill("vit." + name, whole(tensor), tuple(tensor.shape), m.vision_checkpoint)
    else:
        for name, t in _named_tensors(build_vision(cfg, device, ops)):
            targets.fill("vit." + name, whole(t), tuple(t.shape), "the random vision tower")
    ln_vision, connector = build_connector(cfg, *widths, device, ops)
    for prefix, module in (("ln_vision.", ln_vision), ("connector.", connector)):
        for name, t in _named_tensors(module) if module is not None else ():
            targets.fill(prefix + name, whole(t), tuple(t.shape), "the connector's init")
    _start_from(cfg, targets)


def _start_from(cfg: Config, targets: ShardedTargets) -> None:
    """`model.projection_checkpoint` and `model.adapter_checkpoint` over the fresh init, by rows."""
    m = cfg.model
    if m.projection_checkpoint:
        _overwrite(targets, "connector.", iter_state_dict(m.projection_checkpoint), m.projection_checkpoint,
                   rename=lambda k: k.removeprefix("model.") if k.startswith("model.mm_projector.") else k)  # fmt: skip
    if m.adapter_checkpoint:
        path = Path(m.adapter_checkpoint) / "adapter_model.safetensors"
        _overwrite(targets, "llm.", iter_state_dict(path), str(path), rename=lambda k: k.removeprefix(PEFT_PREFIX))


def _overwrite(targets: ShardedTargets, prefix: str, items, source: str, rename) -> None:
    for key, tensor in items:
        name = prefix + rename(key)
        if name not in targets:
            raise CheckpointError(f"{source}: {key} matches no trainable parameter of the model the config builds")
        targets.filled.discard(targets.canonical[name])
        targets.fill(name, whole(tensor), tuple(tensor.shape), source)


def _init_adapters(targets: ShardedTargets, device: torch.device, dtype: torch.dtype) -> None:
    """The fresh adapters of `build_llm` (`init_fresh_adapters`): drawn whole, in its order, on its
    device and in its dtype, by `LoRALinear.reset_lora_parameters` itself; each rank keeps its rows."""
    for owner, init in targets.adapters:
        a, b = targets.shape(owner + ".lora_A.weight"), targets.shape(owner + ".lora_B.weight")
        stub = types.SimpleNamespace(
            init=init, r=a[0],
            lora_A=types.SimpleNamespace(weight=torch.empty(a, device=device, dtype=dtype)),
            lora_B=types.SimpleNamespace(weight=torch.empty(b, device=device, dtype=dtype)),
        )  # fmt: skip
        LoRALinear.reset_lora_parameters(stub)
        targets.fill(owner + ".lora_A.weight", whole(stub.lora_A.weight), a, "the fresh adapter")
        targets.fill(owner + ".lora_B.weight", whole(stub.lora_B.weight), b, "the fresh adapter")
