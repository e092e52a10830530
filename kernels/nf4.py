"""4-bit NF4 weights in bitsandbytes' format: a tensor subclass, its torch dequantization, and
the Triton kernels (dequantize, fused dequant-matmul).

NF4Tensor
  `to_nf4(w)` returns an `NF4Tensor`, a wrapper tensor subclass whose shape and dtype are those
  of the dequantized weight (`[out, in]`, bf16/fp16/fp32) and whose data are bitsandbytes' packed
  codes and quantization state, held as inner tensors (`__tensor_flatten__`). So it is one tensor
  to `nn.Module`, `state_dict`, `torch.utils._pytree`, torch.compile and FSDP2: it lives in
  `nn.Parameter(q, requires_grad=False)`; `.to(device)` moves the codes and `.to(dtype)` changes
  only the dtype it dequantizes to; `copy_` from another NF4Tensor copies the codes and from a
  dense float tensor quantizes it, so `load_state_dict` takes either (a bf16 base checkpoint
  loads into a QLoRA model); `F.linear(x, q)` and `x @ q.t()` dequantize in plain PyTorch (the
  `kernels: torch` path), in the forward and again in the backward, so the dense weight is never
  kept for backward. Every other op reads the dequantized values, and only `copy_` and `zero_`
  write. FSDP2 shards it along dim 0 in whole quantization blocks (see `_split`).
  `torch.load(..., weights_only=True)` needs only `NF4Tensor` among the safe globals, which
  importing this module registers.

Format (bitsandbytes 0.50 `quantize_4bit(..., quant_type="nf4")`): the weight is flattened
row-major and cut into blocks of `blocksize` (64) values, which may straddle rows. Each block is
scaled by `1 / absmax` into [-1, 1] and each value takes the index of the nearest of the 16 NF4
code values (ties to the lower code); two 4-bit codes share a byte, the even element in the high
nibble; the bytes are stored as a `[ceil(n/2), 1]` uint8 tensor. With double quantization
(`compress_statistics`) the fp32 absmax vector is centred on its mean (`offset`) and quantized
blockwise (blocks of 256) to 8 bits with bitsandbytes' signed dynamic map; `nested_absmax`
holds one fp32 scale per 256-block.

Bit-exactness: `to_nf4` reproduces bitsandbytes' CPU backend byte for byte, including its C++
8-bit quantizer (a 65536-entry look-up table over [-1, 1], not exact nearest rounding) and the
stored absmax of an all-zero tail block (clamped to 1e-38). Dequantization is
`quant_map[code] * absmax` in fp32 with the nested absmax rebuilt as
`nested_code[q] * nested_absmax + offset` (two separately rounded fp32 ops, so the kernels are
compiled without FMA contraction), then one round-to-nearest-even cast: both
`NF4Tensor.dequantize` (torch) and `dequantize_nf4` (Triton) are bit-identical to
`bitsandbytes.functional.dequantize_4bit` for fp32, fp16 and bf16 outputs (the kernel casts with
the GPU's round to nearest even; the tests give the interpreter's casts the same rounding with
tests/kernels/bf16_interpreter.py).

Matmul, as bitsandbytes and Unsloth do it: nothing dequantizes inside the K loop of a big GEMM.
`nf4_matmul(x, q, bias, lora_xa=, lora_b=, scaling=, out=)` computes
`x @ W^T + bias + scaling * lora_xa @ lora_b^T`.
- M <= 16 rows (decoding, evaluation): a split-K GEMV (`_gemv_kernel`) that reads each packed
  byte once, in 16-byte vectors two tiles ahead of their use, gathers the codes in x's dtype,
  multiplies on the tensor cores (bf16/fp16 MMA, fp32 accumulation; rows padded to 16) and
  scales the fp32 partial products by the block absmax. The last program of each column tile
  (an acq_rel counter) sums the split-K slices in a fixed order, in the same launch.
- More rows: the weight is dequantized once (`_dequant_kernel`: 128-bit loads, one absmax per
  thread, 128-bit stores) into a per-device buffer in the compute dtype that every layer reuses
  (`_dequantized`), then cuBLAS. With LoRA, `_expand_kernel` writes `bias + scaling * xa B^T`
  first and cuBLAS adds the GEMM onto it (beta = 1).
`nf4_matmul_t(dy, q, lora_g=, lora_a=, seed=, dropout_p=, mask=, out=)` is `dy @ W` for the
backward: the buffer's W (still there if nothing evicted it since the forward) and cuBLAS, plus
the LoRA part of dX (`keep * (g @ A) / (1 - p)` with kernels.lora's dropout mask, packed or drawn
from the seed) written first by `_expand_kernel`.

Memory policy: the dequantized-weight buffer holds one weight (the largest seen) per device,
stream and dtype, so QLoRA's memory stays the NF4 codes plus one layer's dense weight;
`set_dequant_cache_budget(bytes)` ($PEFOMED_NF4_CACHE_MB) keeps more recently used weights, so
that a backward reuses its forward's dequantization (with activation checkpointing, one block's
weights let every recomputed forward and its backward share one). Every call only launches
kernels: the code tables and split-K counters stay on the device, nothing syncs with the host,
and no allocation has a data-dependent size, so the ops can be captured in CUDA graphs (the
caches are bypassed during capture; see `_dequantized`).

The `torch.library` custom ops `pefomed::nf4_linear` (with autograd), `pefomed::nf4_matmul_t`
and `pefomed::nf4_dequantize` take the NF4Tensor as its inner tensors and layout
(`nf4_op_args`), so torch.compile traces them whole; `kernels.lora` runs QLoRA through them.
`STATIC_CASES` registers every kernel with the compile gate (bench/static.py).

Importing this module does not import Triton: the kernels below are plain functions until the
first launch jit-compiles them (`_triton`), so the tensor subclass and its torch path run where
Triton is not installed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
aten = torch.ops.aten

# bitsandbytes' `get_4bit_type("nf4")`: quantiles of N(0, 1) normalized to [-1, 1], with an exact 0.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)  # fmt: skip

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
SMALL_M = 16  # M at or below this takes the GEMV-like kernel
_ZERO_BYTE = 0x77  # code 7 is NF4's exact 0.0, in both nibbles
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer discretizes [-1, 1] into this many bins
_STATE_KEY = "quant_state.bitsandbytes__nf4"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # quantized from, and the kernels' dtypes
_LOGICAL_DTYPES = (*_FLOAT_DTYPES, torch.float64)  # what an NF4Tensor may dequantize to (float64 for oracles)
_INNER = ("packed", "absmax", "quant_map", "offset", "nested_absmax", "nested_code")


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 7 decades of means of linear fractions, +-, 0, 1."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher writes comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


_CODES: dict[torch.device, torch.Tensor] = {}


def _nf4_code_on(device: torch.device) -> torch.Tensor:
    """NF4_CODE on `device` for the quantizer's searches (read only; every NF4Tensor owns its quant_map)."""
    if device not in _CODES:
        _CODES[device] = NF4_CODE.to(device)
    return _CODES[device]


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


# --- the tensor subclass ------------------------------------------------------------------------


class NF4Tensor(torch.Tensor):
    """A frozen weight stored as NF4 in bitsandbytes' layout, seen as its dequantized tensor.

    Inner tensors (`__tensor_flatten__`): `packed` uint8 `[ceil(n/2), 1]`, high nibble first;
    `absmax` fp32 `[n_blocks]`, or uint8 codes into `nested_code` when double-quantized, with
    `offset` (fp32 0-d), `nested_absmax` (fp32 `[ceil(n_blocks/256)]`) and `nested_code` (fp32
    `[256]`, the dynamic map); `quant_map` fp32 `[16]`, the NF4 code values. Layout:
    `blocksize`, `nested_blocksize`. The codes are always in the row-major order of a contiguous
    tensor; a 2-D NF4Tensor may also be a transposed view of one (`q.t()`).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    offset: torch.Tensor | None
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    blocksize: int
    nested_blocksize: int

    @staticmethod
    def __new__(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int = 64,
        offset: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        nested_blocksize: int = NESTED_BLOCKSIZE,
        quant_map: torch.Tensor | None = None,
        stride: Sequence[int] | None = None,
    ) -> NF4Tensor:
        shape = torch.Size(shape)
        if dtype not in _LOGICAL_DTYPES:
            raise TypeError(f"NF4Tensor(shape={list(shape)}): dtype {dtype} is not one it dequantizes to {_LOGICAL_DTYPES}")
        strides = tuple(stride) if stride is not None else _contiguous_strides(shape)
        self = torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=strides, dtype=dtype, device=packed.device, requires_grad=False
        )
        self.packed = packed
        self.absmax = absmax
        self.quant_map = NF4_CODE.to(packed.device, copy=True) if quant_map is None else quant_map
        self.offset = offset
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.blocksize = int(blocksize)
        self.nested_blocksize = int(nested_blocksize)
        # True for a piece cut from a double-quantized weight: its `offset` is the whole weight's.
        self.shares_offset = False
        self._validate()
        return self

    def _validate(self) -> None:
        n = self.numel()
        where = f"NF4Tensor(shape={list(self.shape)})"
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"{where}: packed must be uint8 with ceil(n/2) = {(n + 1) // 2} bytes, got "
                f"{self.packed.dtype} with {self.packed.numel()}; was the state dict saved with quant_storage=uint8?"
            )
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"{where}: blocksize {self.blocksize} is not one of {VALID_BLOCKSIZES}")
        n_blocks = -(n // -self.blocksize)
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"{where}: absmax has {self.absmax.numel()} entries, expected one per {self.blocksize}-block = {n_blocks}")
        parts = (self.offset, self.nested_absmax, self.nested_code)
        if any(p is None for p in parts) != all(p is None for p in parts):
            raise ValueError(f"{where}: offset, nested_absmax and nested_code must be given together (double quantization) or not at all")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"{where}: a double-quantized absmax must be uint8 codes, got {self.absmax.dtype}")
            expected = -(n_blocks // -self.nested_blocksize)
            if self.nested_absmax.numel() != expected or self.nested_code.numel() != 256 or self.offset.numel() != 1:
                raise ValueError(
                    f"{where}: nested_absmax needs {expected} entries (one per {self.nested_blocksize} blocks), "
                    f"nested_code 256 and offset 1, got {self.nested_absmax.numel()}, {self.nested_code.numel()} "
                    f"and {self.offset.numel()}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"{where}: absmax must be float32, got {self.absmax.dtype}")
        if self.quant_map.numel() != 16:
            raise ValueError(f"{where}: quant_map must hold the 16 NF4 values, got {self.quant_map.numel()}")
        for name in _INNER:
            t = getattr(self, name)
            if t is not None and t.device != self.packed.device:
                raise ValueError(f"{where}: {name} is on {t.device} but packed on {self.packed.device}; build it on one device")
        if not self.is_contiguous() and (self.dim() != 2 or self.stride() != (1, self.shape[0])):
            raise ValueError(f"{where}: strides {self.stride()} are neither contiguous nor a transposed 2-D weight's")

    # --- what the codes mean ------------------------------------------------------------------

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @property
    def nested_quant_map(self) -> torch.Tensor | None:
        """bitsandbytes' name for `nested_code`."""
        return self.nested_code

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block, rebuilt as bitsandbytes does (code8[q] * absmax2, then + offset)."""
        if not self.nested:
            return self.absmax
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return self.nested_code[self.absmax.long()] * scale + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in `dtype` (default: this tensor's), in plain PyTorch, bit-identical to
        bitsandbytes' `dequantize_4bit`; a transposed view gives the transposed weight."""
        dtype = dtype or self.dtype
        if dtype not in _LOGICAL_DTYPES:
            raise TypeError(f"NF4Tensor.dequantize: dtype {dtype} is not one of {_LOGICAL_DTYPES}")
        n, bs = self.numel(), self.blocksize
        n_blocks = self.absmax.numel()
        packed = self.packed.reshape(-1)
        codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)
        # 2 * ceil(n/2) <= n_blocks * blocksize because the blocksize is even
        codes = F.pad(codes, (0, n_blocks * bs - codes.numel()))
        values = self.quant_map.float()[codes.int()].view(n_blocks, bs) * self.block_absmax().float().view(n_blocks, 1)
        weight = values.view(-1)[:n].view(self._stored_shape()).to(dtype)
        return weight if self.is_contiguous() else weight.t()

    def _stored_shape(self) -> torch.Size:
        """The shape whose row-major order the codes follow (a transposed view's is reversed)."""
        return self.shape if self.is_contiguous() else torch.Size((self.shape[1], self.shape[0]))

    def __repr__(self) -> str:
        nested = f", nested_blocksize={self.nested_blocksize}" if self.nested else ""
        view = "" if self.is_contiguous() else ", transposed"
        return f"NF4Tensor(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, blocksize={self.blocksize}{nested}{view})"

    # --- bitsandbytes Linear4bit state dicts ----------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The entries `bnb.nn.Linear4bit.state_dict()` holds for this weight, under `prefix`."""
        if not self.is_contiguous():
            raise ValueError(f"to_bnb_state_dict: {self!r} is a transposed view; save the [out, in] weight")
        state = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.nested:
            state[f"{prefix}.nested_absmax"] = self.nested_absmax
            state[f"{prefix}.nested_quant_map"] = self.nested_code
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset.item())
        state[f"{prefix}.{_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return state

    @classmethod
    def from_bnb_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Rebuild the weight from a `bnb.nn.Linear4bit` (nf4) state dict (keys under `prefix`)."""
        key = f"{prefix}.{_STATE_KEY}"
        if key not in state:
            found = sorted(k for k in state if k.startswith(f"{prefix}.quant_state"))
            raise ValueError(
                f"{key} missing from the state dict (found {found or 'no quant_state'}): only bitsandbytes "
                "NF4 weights are supported (not fp4 or 8-bit); save them with Linear4bit(quant_type='nf4')"
            )
        meta = json.loads(bytes(state[key].cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{key}: quant_type is {meta.get('quant_type')!r}, expected 'nf4'")
        packed = state[prefix]
        if packed.dtype != torch.uint8:
            raise ValueError(
                f"{prefix}: packed weight has dtype {packed.dtype}; bitsandbytes' quant_storage must be uint8 "
                "(re-save the Linear4bit with quant_storage=torch.uint8)"
            )
        quant_map = state.get(f"{prefix}.quant_map")
        if quant_map is not None and not torch.equal(quant_map.float().cpu(), NF4_CODE):
            raise ValueError(f"{prefix}.quant_map differs from bitsandbytes' NF4 code values")
        nested = f"{prefix}.nested_absmax" in state
        device = packed.device
        return cls(
            packed.detach(),
            state[f"{prefix}.absmax"].detach(),
            tuple(meta["shape"]),
            getattr(torch, meta["dtype"]),
            int(meta["blocksize"]),
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
            nested_absmax=state[f"{prefix}.nested_absmax"].detach() if nested else None,
            nested_code=state[f"{prefix}.nested_quant_map"].detach() if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            quant_map=None if quant_map is None else quant_map.detach().float(),
        )

    # --- tensor-subclass protocol -----------------------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        names = [name for name in _INNER if getattr(self, name) is not None]
        return names, (self.blocksize, self.nested_blocksize, self.dtype, self.shares_offset)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Sequence[int], outer_stride: Sequence[int]) -> NF4Tensor:
        blocksize, nested_blocksize, dtype, shares_offset = meta
        q = NF4Tensor(
            inner["packed"], inner["absmax"], outer_size, dtype, blocksize, inner.get("offset"),
            inner.get("nested_absmax"), inner.get("nested_code"), nested_blocksize, inner["quant_map"], stride=outer_stride,
        )  # fmt: skip
        q.shares_offset = shares_offset
        return q

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not all(issubclass(cls, t) for t in types):
            return NotImplemented  # another subclass (DTensor, FakeTensor, ...) handles the op first
        handler = _DISPATCH.get(func) or _DISPATCH_BY_NAME.get(func._schema.name)
        if handler is not None:
            return handler(func, args, kwargs or {})
        return _read_dequantized(func, args, kwargs or {})

    # --- FSDP2 (`fully_shard`): all-gather the codes, not a dense weight ------------------------

    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: torch.Size, outer_stride: tuple[int, ...], module: torch.nn.Module, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """The local shard's codes (gathered along dim 0); the nested offset and maps ride along as metadata."""
        world = mesh.size()
        if outer_size[0] % world:
            raise ValueError(
                f"FSDP2 shards NF4 weight {list(outer_size)} unevenly over {world} ranks: it needs out_features "
                f"divisible by the world size, because an NF4 shard cannot be padded to the size FSDP2 requires; "
                f"keep this layer out of fully_shard or use a world size dividing {outer_size[0]}"
            )
        sharded = (self.packed, self.absmax, self.nested_absmax) if self.nested else (self.packed, self.absmax)
        return sharded, (tuple(outer_size), self.blocksize, self.nested_blocksize, self.quant_map, self.offset, self.nested_code)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: tuple,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[NF4Tensor, tuple[torch.Tensor, ...]] | None:
        """The unsharded NF4Tensor over the all-gather buffers, in FSDP2's param dtype (mixed precision
        changes the dtype it dequantizes to, not the codes)."""
        shape, blocksize, nested_blocksize, quant_map, offset, nested_code = metadata
        packed, absmax, *nested_absmax = all_gather_outputs
        if out is not None:
            # FSDP2 refills the same buffers on every unshard, and `out` already holds them.
            if out.packed.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
                raise RuntimeError(f"FSDP2 all-gathered NF4 weight {list(shape)} into new buffers, but the unsharded NF4Tensor holds others")
            return None
        full = NF4Tensor(
            packed, absmax, shape, param_dtype, blocksize, offset, nested_absmax[0] if nested_absmax else None,
            nested_code, nested_blocksize, quant_map,
        )  # fmt: skip
        return full, tuple(all_gather_outputs)


# --- quantization (torch; runs once per weight at load time) ---------------------------------


def _quantize_4bit_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' default-backend `quantize_4bit` for nf4: (packed [ceil(n/2), 1], absmax)."""
    code = _nf4_code_on(flat.device)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)  # stored clamped, as bitsandbytes does
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


_LUTS: dict[torch.device, torch.Tensor] = {}


def _quantize_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU quantizer table: bin i of [-1, 1] -> number of code midpoints below it."""
    if code.device not in _LUTS:
        midpoints = 0.5 * (code[:-1] + code[1:])
        i = torch.arange(_LUT_SIZE, dtype=torch.float64, device=code.device)
        bins = -1.0 + (2.0 * i / (_LUT_SIZE - 1)).float()  # C++: -1.0f + (2.0f * i) / 65535, in fp32
        _LUTS[code.device] = torch.searchsorted(midpoints, bins, side="left").to(torch.uint8)
    return _LUTS[code.device]


def _quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU `quantize_blockwise` (fp32): per-block absmax, then the 65536-bin table."""
    n = values.numel()
    n_blocks = -(n // -blocksize)
    blocks = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax).view(-1, 1), -1, 1)
    # C++: uint16((v + 1.0f) * 0.5f * 65535 + 0.5f), each op rounded to fp32
    bins = ((scaled + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _quantize_lut(code)[bins.clamp(0, _LUT_SIZE - 1)]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)  # C++ writes code 0 for an all-zero block
    return q.reshape(-1)[:n], absmax


def to_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4-quantize `weight` byte-identically to bitsandbytes 0.50's CPU `quantize_4bit(..., "nf4")`.

    The result has the weight's shape, dtype and device; hold it as
    `nn.Parameter(to_nf4(w), requires_grad=False)`.
    """
    if isinstance(weight, NF4Tensor):
        raise TypeError(f"to_nf4: the weight is already {weight!r}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"to_nf4: weight dtype {weight.dtype} is not supported; cast it to float32, float16 or bfloat16")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"to_nf4: blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
    if weight.numel() == 0:
        raise ValueError(f"to_nf4: the weight is empty (shape {list(weight.shape)})")
    flat = weight.detach().reshape(-1).float()
    packed, absmax = _quantize_4bit_codes(flat, blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    nested_code = dynamic_map_signed().to(flat.device)
    q_absmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Tensor(packed, q_absmax, weight.shape, weight.dtype, blocksize, offset, nested_absmax, nested_code)


# --- aten ops on NF4Tensor (__torch_dispatch__) ---------------------------------------------------
# Views and copies that keep NF4 (what nn.Module, state_dict, torch.compile and FSDP2 call) have
# handlers; every other op reads the dequantized values (`_read_dequantized`).

_DISPATCH: dict[Any, Callable] = {}


def _implements(*ops: Any) -> Callable:
    def register(fn: Callable) -> Callable:
        for op in ops:
            _DISPATCH[op] = fn
        return fn

    return register


def _rebuilt(
    q: NF4Tensor,
    *,
    shape: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    shares_offset: bool | None = None,
    **tensors: torch.Tensor,
) -> NF4Tensor:
    """q with the given fields replaced and the others shared (a view when only shape/stride change)."""
    fields = {name: getattr(q, name) for name in _INNER}
    fields.update(tensors)
    if stride is None:
        stride = q.stride() if shape is None else _contiguous_strides(shape)
    out = NF4Tensor(
        fields["packed"], fields["absmax"], q.shape if shape is None else shape, dtype or q.dtype, q.blocksize,
        fields["offset"], fields["nested_absmax"], fields["nested_code"], q.nested_blocksize, fields["quant_map"],
        stride=stride,
    )  # fmt: skip
    out.shares_offset = q.shares_offset if shares_offset is None else shares_offset
    return out


def _mapped(q: NF4Tensor, fn: Callable[[torch.Tensor], torch.Tensor], **changes: Any) -> NF4Tensor:
    """q with `fn` applied to every inner tensor."""
    return _rebuilt(q, **{name: fn(getattr(q, name)) for name in _INNER if getattr(q, name) is not None}, **changes)


def _read_dequantized(func: Any, args: tuple, kwargs: dict) -> Any:
    """Any op without a handler runs on the dequantized values; one that would write into an NF4Tensor raises."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if any(isinstance(t, NF4Tensor) for t in tree_leaves(value)):
                raise RuntimeError(
                    f"{func} writes into an NF4Tensor, which only copy_ and zero_ change (it is a frozen weight); "
                    "write into a dense copy, w = q.dequantize()"
                )
    args, kwargs = tree_map_only(NF4Tensor, lambda q: q.dequantize(), (args, kwargs))
    return func(*args, **kwargs)


@_implements(aten.detach.default, aten.alias.default)
def _alias(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    return _rebuilt(args[0])


@_implements(aten.dequantize.self)
def _dequantize(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0].dequantize()


@_implements(aten.clone.default)
def _clone(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    q, memory_format = args[0], kwargs.get("memory_format", torch.preserve_format)
    if memory_format == torch.preserve_format or (memory_format == torch.contiguous_format and q.is_contiguous()):
        return _mapped(q, torch.clone)
    return func(q.dequantize(), **kwargs)  # the codes follow one row-major order; another layout is dense


@_implements(aten._to_copy.default)
def _to_copy(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    q = args[0]
    dtype, device = kwargs.get("dtype") or q.dtype, kwargs.get("device") or q.device
    if dtype not in _LOGICAL_DTYPES:
        raise TypeError(
            f"{q!r}.to({dtype}): an NF4 weight converts only to a float dtype it dequantizes to {_LOGICAL_DTYPES}; "
            f"for a dense copy use q.dequantize().to({dtype})"
        )
    if kwargs.get("layout") not in (None, torch.strided):
        raise TypeError(f"{q!r}.to(layout={kwargs['layout']}): an NF4 weight is strided")
    non_blocking = kwargs.get("non_blocking", False)
    moved = _mapped(q, lambda t: t.to(device, non_blocking=non_blocking, copy=True), dtype=dtype)
    return _mapped(moved, torch.Tensor.pin_memory) if kwargs.get("pin_memory") else moved


@_implements(aten.is_pinned.default)
def _is_pinned(func: Any, args: tuple, kwargs: dict) -> bool:
    return all(getattr(args[0], name).is_pinned() for name in _INNER if getattr(args[0], name) is not None)


@_implements(aten._pin_memory.default)
def _pin_memory(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    return _mapped(args[0], torch.Tensor.pin_memory)


def _same_layout(a: NF4Tensor, b: NF4Tensor) -> bool:
    return (a.blocksize, a.nested, a.nested_blocksize) == (b.blocksize, b.nested, b.nested_blocksize)


@_implements(aten.copy_.default)
def _copy_(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """Copy the codes in place (views share them). A dense float source is quantized first with the
    destination's blocksize and double quantization, which is how a bf16 base checkpoint loads."""
    dst, src = args[0], args[1]
    if not isinstance(dst, NF4Tensor):
        return dst.copy_(src.dequantize(), **kwargs)
    if src.shape != dst.shape or not dst.is_contiguous():
        raise RuntimeError(
            f"copy_ into {dst!r} from a tensor of shape {list(src.shape)}: an NF4Tensor takes a source of its own "
            "shape and is not a transposed view"
        )
    if not isinstance(src, NF4Tensor):
        if not src.dtype.is_floating_point:
            raise TypeError(f"copy_ into {dst!r}: the source is {src.dtype}; an NF4 weight quantizes float values")
        dense = src.detach().to(dst.device)
        src = to_nf4(dense if dense.dtype in _FLOAT_DTYPES else dense.float(), dst.blocksize, dst.nested)
    if not src.is_contiguous() or not _same_layout(src, dst):
        raise ValueError(
            f"copy_ into {dst!r} from {src!r}: the codes copy only between the same layout (blocksize, double "
            "quantization, not transposed); load it with load_state_dict(..., assign=True), or quantize the dense "
            f"weight with to_nf4(w, blocksize={dst.blocksize}, double_quant={dst.nested})"
        )
    if dst.shares_offset and not torch.equal(dst.offset, src.offset):
        raise ValueError(
            f"copy_ into {dst!r}, a piece of a double-quantized weight: its nested offset is the whole weight's, so "
            "the source must have the same offset; copy into the whole weight instead"
        )
    non_blocking = kwargs.get("non_blocking", False)
    for name in _INNER:
        if getattr(dst, name) is not None:
            getattr(dst, name).copy_(getattr(src, name), non_blocking=non_blocking)
            _mark_written(getattr(dst, name))
    return dst


def _mark_written(inner: torch.Tensor) -> None:
    """Bump an inner tensor's version counter: writes made here, below autograd, do not, and the
    kernels' dequantized-weight buffer (`_dequantized`) keys on them."""
    if not inner.is_inference():
        torch.autograd.graph.increment_version(inner)


@_implements(aten.zero_.default)
def _zero_(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    args[0].packed.fill_(_ZERO_BYTE)  # the zero code is 0.0 whatever the block's absmax
    _mark_written(args[0].packed)
    return args[0]


def _table(table: torch.Tensor, build: Any, device: torch.device) -> torch.Tensor:
    """A copy of a constant code table on `device`; rebuilt when the source is on meta (a model
    built on the meta device and materialized with `to_empty`, as sharded loading does)."""
    if table.is_meta and device.type != "meta":
        return build().to(device=device, dtype=table.dtype)
    return table.to(device, copy=True)


def _zeros(q: NF4Tensor, shape: Sequence[int], dtype: torch.dtype | None, device: Any) -> NF4Tensor:
    """All-zero NF4Tensor of `shape`, laid out as a piece of that size cut from q would be (see `_split`)."""
    shape = torch.Size(shape)
    dtype = dtype or q.dtype
    if dtype not in _LOGICAL_DTYPES:
        return torch.zeros(shape, dtype=dtype, device=device or q.device)
    device = torch.device(device) if device is not None else q.device
    n = shape.numel()
    n_blocks = -(n // -q.blocksize)
    packed = torch.full(((n + 1) // 2, 1), _ZERO_BYTE, dtype=torch.uint8, device=device)
    if q.nested and _on_nested_boundary(q, n):
        return NF4Tensor(
            packed, torch.zeros(n_blocks, dtype=torch.uint8, device=device), shape, dtype, q.blocksize,
            torch.zeros((), device=device), torch.zeros(-(n_blocks // -q.nested_blocksize), device=device),
            _table(q.nested_code, dynamic_map_signed, device), q.nested_blocksize,
            _table(q.quant_map, lambda: NF4_CODE, device),
        )  # fmt: skip
    absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
    return NF4Tensor(packed, absmax, shape, dtype, q.blocksize, quant_map=_table(q.quant_map, lambda: NF4_CODE, device))


@_implements(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    return _zeros(args[0], args[1], kwargs.get("dtype"), kwargs.get("device"))


@_implements(aten.empty_like.default, aten.zeros_like.default)
def _zeros_like(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    q = args[0]
    out = _zeros(q, q._stored_shape(), kwargs.get("dtype"), kwargs.get("device"))
    if isinstance(out, NF4Tensor) and not q.is_contiguous():
        return _rebuilt(out, shape=q.shape, stride=q.stride())
    return out if isinstance(out, NF4Tensor) else out.view(q.shape)


def _infer_shape(size: Sequence[int], numel: int) -> torch.Size:
    size = list(size)
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = numel // known if known else 0
    if math.prod(size) != numel:
        raise RuntimeError(f"shape {list(size)} is invalid for an NF4Tensor of {numel} elements")
    return torch.Size(size)


@_implements(aten.view.default, aten._unsafe_view.default)
def _view(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    q = args[0]
    shape = _infer_shape(args[1], q.numel())
    if shape == q.shape:
        return _rebuilt(q)
    if not q.is_contiguous():
        raise RuntimeError(f"view({list(shape)}) of {q!r}: view the [out, in] weight, then transpose")
    return _rebuilt(q, shape=shape)


@_implements(aten.as_strided.default)
def _as_strided(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    q, size, stride = args[0], torch.Size(args[1]), tuple(args[2])
    storage_offset = (args[3] if len(args) > 3 else kwargs.get("storage_offset")) or 0
    if storage_offset == 0 and (size, stride) == (q.shape, q.stride()):
        return _rebuilt(q)
    if storage_offset == 0 and q.is_contiguous() and size.numel() == q.numel() and stride == _contiguous_strides(size):
        return _rebuilt(q, shape=size)
    raise NotImplementedError(
        f"as_strided(size={list(size)}, stride={list(stride)}, storage_offset={storage_offset}) of {q!r}: "
        "only whole-weight contiguous views keep NF4's block order; dequantize first"
    )


@_implements(aten.t.default, aten.transpose.int, aten.permute.default)
def _transpose(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    q = args[0]
    if func is aten.permute.default:
        swap = [d % max(q.dim(), 1) for d in args[1]] == [1, 0]
    elif func is aten.transpose.int:
        swap = q.dim() == 2 and args[1] % 2 != args[2] % 2
    else:
        swap = q.dim() == 2
    if q.dim() > 2:
        return _read_dequantized(func, args, kwargs)
    if not swap:
        return _rebuilt(q)
    return _rebuilt(q, shape=(q.shape[1], q.shape[0]), stride=(q.stride(1), q.stride(0)))


def _on_nested_boundary(q: NF4Tensor, elements: int) -> bool:
    """Whether `elements` (where a piece of q starts, or its size) is all of q or a whole number of
    nested blocks (blocksize * 256 elements): pieces cut there keep the nested absmax."""
    return elements == q.numel() or elements % (q.blocksize * q.nested_blocksize) == 0


def _piece(q: NF4Tensor, begin: int, end: int, keep_nesting: bool, block_absmax: torch.Tensor | None) -> NF4Tensor:
    """Rows [begin, end) of q. Whole blocks are views of q's codes; a double-quantized piece that does
    not start on a nested block gets its own fp32 absmax (`block_absmax`, the same values) and codes."""
    row = q.numel() // q.shape[0] if q.shape[0] else 0
    first, last = begin * row, end * row
    if first % q.blocksize or (last % q.blocksize and last != q.numel()):
        raise ValueError(
            f"rows [{begin}, {end}) of {q!r} are not whole {q.blocksize}-element quantization blocks "
            f"({row} elements a row); FSDP2 needs each rank's rows * {row} to be a multiple of {q.blocksize}: "
            "use a world size that divides the weight so, or quantize with a smaller blocksize"
        )
    b0, b1 = first // q.blocksize, -(-last // q.blocksize)
    shape = (end - begin, *q.shape[1:])
    packed = q.packed[first // 2 : (last + 1) // 2]
    if not q.nested:
        return _rebuilt(q, shape=shape, packed=packed, absmax=q.absmax[b0:b1])
    if keep_nesting:
        nb = q.nested_blocksize
        nested_absmax = q.nested_absmax[b0 // nb : -(-b1 // nb)]
        return _rebuilt(q, shape=shape, packed=packed, absmax=q.absmax[b0:b1], nested_absmax=nested_absmax, shares_offset=True)
    return NF4Tensor(packed.clone(), block_absmax[b0:b1].clone(), shape, q.dtype, q.blocksize, quant_map=q.quant_map.clone())


def _split(q: NF4Tensor, sizes: Sequence[int], dim: int) -> list[NF4Tensor]:
    """Pieces of q along dim 0 (FSDP2's shards). Double quantization survives when every piece
    starts on a 256-block boundary (e.g. 4 rows of 4096); otherwise every piece carries plain fp32
    absmax (the same values, so dequantization stays bit-identical) and the gathered weight too."""
    if dim % max(q.dim(), 1) != 0 or not q.is_contiguous():
        raise NotImplementedError(f"split of {q!r} along dim {dim}: NF4 weights split only along dim 0 (whole rows)")
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    row = q.numel() // q.shape[0] if q.shape[0] else 0
    keep = not q.nested or all(_on_nested_boundary(q, start * row) for start in starts[1:-1])
    block_absmax = q.block_absmax().float() if q.nested and not keep else None
    return [_piece(q, a, b, keep, block_absmax) for a, b in zip(starts[:-1], starts[1:])]


@_implements(aten.split.Tensor)
def _split_tensor(func: Any, args: tuple, kwargs: dict) -> list[NF4Tensor]:
    q, split_size = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    rows = q.shape[dim] if q.dim() else 1
    sizes = [min(split_size, rows - start) for start in range(0, rows, split_size)] if split_size else [rows]
    return _split(q, sizes, dim)


@_implements(aten.split_with_sizes.default)
def _split_with_sizes(func: Any, args: tuple, kwargs: dict) -> list[NF4Tensor]:
    return _split(args[0], list(args[1]), args[2] if len(args) > 2 else kwargs.get("dim", 0))


@_implements(aten.slice.Tensor)
def _slice(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    q = args[0]
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
    dim = dim % max(q.dim(), 1)
    size = q.shape[dim]
    start, end, _ = slice(start, end).indices(size)
    if start == 0 and end >= size and step == 1:
        return _rebuilt(q)
    if dim != 0 or step != 1 or not q.is_contiguous():
        raise NotImplementedError(
            f"slice(dim={dim}, start={start}, end={end}, step={step}) of {q!r}: only whole rows along dim 0 "
            "stay NF4; dequantize first, q.dequantize()[...]"
        )
    end = max(start, end)
    row = q.numel() // size
    keep = not q.nested or _on_nested_boundary(q, start * row)
    return _piece(q, start, end, keep, None if keep else q.block_absmax().float())


def _sharded_fields(q: NF4Tensor) -> tuple[str, ...]:
    return ("packed", "absmax", "nested_absmax") if q.nested else ("packed", "absmax")


@_implements(torch.ops._c10d_functional.all_gather_into_tensor.default)
def _all_gather(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    """DTensor's all-gather of NF4 shards (e.g. `full_tensor()`): gather the codes, keep the replicated state."""
    q, group_size, group_name = args[:3]
    gathered = {name: func(getattr(q, name), group_size, group_name) for name in _sharded_fields(q)}
    return _rebuilt(q, shape=(q.shape[0] * group_size, *q.shape[1:]), shares_offset=False, **gathered)


@_implements(torch.ops._c10d_functional.wait_tensor.default)
def _wait_tensor(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    return _mapped(args[0], torch.ops._c10d_functional.wait_tensor.default)


# Ops of modules torch imports on demand, matched by name: functional collectives wrap their
# result in an AsyncCollectiveTensor, which has no place for NF4's inner tensors, so wait now.
_DISPATCH_BY_NAME: dict[str, Callable] = {"_c10d_functional::_wrap_tensor_autograd": _wait_tensor}


# --- torch functions on NF4Tensor (__torch_function__): matmuls that never keep a dense weight ----

_FUNCTIONS: dict[Callable, Callable] = {}


def _dense_call(func: Callable, args: tuple, kwargs: dict) -> Any:
    """The default: run `func` below torch functions, where `__torch_dispatch__` takes over."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _stored(q: NF4Tensor) -> NF4Tensor:
    """q without a transposition: the tensor whose row-major order the codes follow."""
    return q if q.is_contiguous() else _rebuilt(q, shape=q._stored_shape())


class _DequantizedMatmul(torch.autograd.Function):
    """`x @ W^T` (transpose) or `x @ W` with W = q.dequantize(), rebuilt in the backward instead of saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: NF4Tensor, transpose: bool) -> torch.Tensor:
        ctx.save_for_backward(q)
        ctx.transpose = transpose
        w = q.dequantize()
        return torch.matmul(x, w.t() if transpose else w)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (q,) = ctx.saved_tensors
        w = q.dequantize()
        return torch.matmul(dy, w if ctx.transpose else w.t()), None, None


def _linear(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """F.linear(x, q, bias) = x @ q^T + bias, with a transposed view of q read as its stored weight."""
    bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
    x, q, bias = bound["input"], bound["weight"], bound.get("bias")
    if not isinstance(q, NF4Tensor) or isinstance(x, NF4Tensor) or q.dim() != 2:
        return _dense_call(func, args, kwargs)
    y = _DequantizedMatmul.apply(x, _stored(q), q.is_contiguous())
    return y if bias is None else y + bias


def _matmul(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """x @ q (torch.matmul, mm, the @ operator) with an NF4 right operand."""
    x, q = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if not isinstance(q, NF4Tensor) or isinstance(x, NF4Tensor) or q.dim() != 2 or "out" in kwargs:
        return _dense_call(func, args, kwargs)
    return _DequantizedMatmul.apply(x, _stored(q), not q.is_contiguous())


def _module_load(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    """`load_state_dict` under `torch.__future__.set_swap_module_params_on_conversion(True)`: a
    dense checkpoint tensor is quantized into NF4 (assign=True keeps its dtype and device)."""
    bound = dict(zip(("self", "other", "assign"), args), **kwargs)
    param, other, assign = bound["self"], bound["other"], bound.get("assign", False)
    if not isinstance(param, NF4Tensor):
        return _dense_call(func, args, kwargs)
    if assign and isinstance(other, NF4Tensor):
        return other.detach()
    if assign:
        dense = other.detach()
        return to_nf4(dense if dense.dtype in _FLOAT_DTYPES else dense.float(), param.blocksize, param.nested)
    return param.copy_(other).detach()


def _dequantize_method(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    if isinstance(args[0], NF4Tensor):
        return NF4Tensor.dequantize(*args, **kwargs)
    return _dense_call(func, args, kwargs)


_FUNCTIONS.update({
    F.linear: _linear,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.Tensor.module_load: _module_load,
    torch.Tensor.dequantize: _dequantize_method,
})  # fmt: skip

torch.serialization.add_safe_globals([NF4Tensor])


# --- shared Triton pieces -----------------------------------------------------------------------
# The kernels' bodies name `tl`, `keep_mask` and `keep_bits` as module globals; `_triton` binds
# them and replaces each `@_jit` function by its `triton.jit` on the first launch.

tl: ModuleType | None = None
keep_mask: Callable | None = None  # kernels.common's, bound with tl
keep_bits: Callable | None = None
_TRITON_FUNCTIONS: list[str] = []


def _jit(fn: Callable) -> Callable:
    """Register `fn` as a Triton kernel, compiled with `triton.jit` by `_triton()`."""
    _TRITON_FUNCTIONS.append(fn.__name__)
    return fn


@functools.cache
def _triton_module() -> ModuleType:
    import triton
    import triton.language as language

    from pefomed.kernels.common import keep_bits, keep_mask

    names = globals()
    names.update(tl=language, keep_mask=keep_mask, keep_bits=keep_bits)
    for name in _TRITON_FUNCTIONS:
        names[name] = triton.jit(names[name])
    return triton


def _triton(what: str) -> ModuleType:
    """The triton module, with this module's kernels compiled; a clear error where Triton is missing."""
    try:
        return _triton_module()
    except ImportError as e:
        raise RuntimeError(
            f"kernels.nf4.{what} needs Triton ({e}); use the `kernels: torch` path "
            "(F.linear(x, q) with q an NF4Tensor, or q.dequantize()), or pip install triton"
        ) from e


@_jit
def _block_scale(absmax, nested_code, nested_absmax, offset, blk, mask, NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `blk`; nested: code8[q] * absmax2 rounded, then + offset rounded."""
    if NESTED:
        q = tl.load(absmax + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code + q, mask=mask, other=0.0) * tl.load(nested_absmax + blk // NESTED_BS, mask=mask, other=0.0)
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + blk, mask=mask, other=0.0)
    return scale


# --- dequantization -----------------------------------------------------------------------------


@_jit
def _dequant_kernel(packed, absmax, quant_map, nested_code, nested_absmax, offset, out, n_bytes, n,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """GROUPS groups of 16 packed bytes (32 values) per program.

    A group lies inside one quantization block (blocksizes are multiples of 32), so each thread
    owns whole groups: one 128-bit load of codes, one absmax, 32 gathers from the 64-byte code
    table (one L1 line), 32 fp32 products, and 128-bit stores of the 32 outputs (Triton routes
    them through shared memory so that a warp writes 512 contiguous bytes).
    """
    g = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    j = g[:, None] * 16 + tl.arange(0, 16)[None, :]
    byte = tl.load(packed + j, mask=j < n_bytes, other=0).to(tl.int32)
    scale = _block_scale(absmax, nested_code, nested_absmax, offset, (g * 32) // BLOCKSIZE, g * 16 < n_bytes, NESTED, NESTED_BS)
    hi = tl.load(quant_map + (byte >> 4)) * scale[:, None]
    lo = tl.load(quant_map + (byte & 15)) * scale[:, None]
    idx = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(out + idx, tl.interleave(hi, lo).to(out.dtype.element_ty), mask=idx < n)


# --- M <= 16: split-K GEMV ------------------------------------------------------------------------


@_jit
def _row_bytes(packed, cols, kb0, kb_end, N, row_bytes, BK: tl.constexpr):
    """Packed bytes [BN, BK/2] of weight rows `cols` from byte kb0 of each row (zero past kb_end / N)."""
    c = kb0 + tl.arange(0, BK // 2)
    # kb_end is a multiple of 16 bytes, so the mask is uniform over each 16-byte vector
    return tl.load(packed + cols.to(tl.int64)[:, None] * row_bytes + c[None, :], mask=(cols < N)[:, None] & (c < kb_end)[None, :], other=0)


@_jit
def _gemv_epilogue(acc, rows, cols, M, N, R, scaling, bias, xa, lora_b, out,
                   stride_bias, stride_am, stride_ar, stride_bn, stride_br, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """acc (+ scaling * xa @ lora_b^T) (+ bias) stored into out[rows, cols] in out's dtype."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    if HAS_LORA:
        for r0 in range(0, R, BR):
            rs = r0 + tl.arange(0, BR)
            rs64 = rs.to(tl.int64)
            a = tl.load(xa + rows64[:, None] * stride_am + rs64[None, :] * stride_ar, mask=(rows < M)[:, None] & (rs < R)[None, :], other=0.0)
            b = tl.load(lora_b + rs64[:, None] * stride_br + cols64[None, :] * stride_bn, mask=(rs < R)[:, None] & (cols < N)[None, :], other=0.0)
            # at most 16 x BN x r products, in the last program of each column tile: exact fp32
            acc += scaling * tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + cols64 * stride_bias, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    ptrs = out + rows64[:, None] * stride_om + cols64[None, :] * stride_on
    tl.store(ptrs, acc.to(out.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@_jit
def _gemv_kernel(x, packed, absmax, quant_map, table, nested_code, nested_absmax, offset, bias, xa, lora_b, out, partial, counters,
                 M, N, K, R, scaling, row_bytes, k_per_split, split_bytes,
                 stride_xm, stride_xk, stride_bias, stride_am, stride_ar, stride_bn, stride_br, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                 NESTED_BS: tl.constexpr, ALIGNED: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, SPLIT_K: tl.constexpr):  # fmt: skip
    """out[:M] = x @ W^T (+ bias) (+ scaling * xa @ lora_b^T) for M <= BM = 16.

    Program (n, s) owns output features [n*BN, (n+1)*BN) and the s-th of SPLIT_K slices of K, and
    reads that part of the packed weight exactly once, two tiles ahead of their use. ALIGNED (K a
    multiple of the blocksize, BK dividing it): each tile row lies in one quantization block, so
    the code table in x's dtype (`table`) is gathered per nibble, the [16, BK] x [BK, BN] product
    runs on the tensor cores with fp32 accumulation, and the block's absmax scales the fp32
    partial product (one multiply per output, not per weight). Otherwise (blocks straddle rows)
    each element finds its own nibble and absmax, and the weight is rounded to x's dtype first.
    With SPLIT_K > 1 each program writes its fp32 partial [M, BN]; the last program of a column
    tile to finish (an acq_rel counter) sums them in slice order, so the result is deterministic,
    runs the epilogue and re-arms the counter for the next launch.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    rows = tl.arange(0, BM)
    rows64 = rows.to(tl.int64)
    x_rows = x + rows64[:, None] * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if ALIGNED:
        kb_begin = pid_k.to(tl.int64) * split_bytes
        kb_end = tl.minimum(kb_begin + split_bytes, row_bytes)
        blocks_per_row = K // BLOCKSIZE
        # two tiles in flight ahead of the one being multiplied: a GEMV is as fast as its loads are deep
        byte = _row_bytes(packed, cols, kb_begin, kb_end, N, row_bytes, BK)
        ahead = _row_bytes(packed, cols, kb_begin + BK // 2, kb_end, N, row_bytes, BK)
        for kb0 in range(kb_begin, kb_end, BK // 2):
            nxt = _row_bytes(packed, cols, kb0 + BK, kb_end, N, row_bytes, BK)
            ks = 2 * kb0 + tl.arange(0, BK)
            a = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=(rows < M)[:, None], other=0.0)
            b = byte.to(tl.int32)
            codes = tl.interleave(tl.load(table + (b >> 4)), tl.load(table + (b & 15)))
            blk = cols.to(tl.int64) * blocks_per_row + (2 * kb0) // BLOCKSIZE
            scale = _block_scale(absmax, nested_code, nested_absmax, offset, blk, cols < N, NESTED, NESTED_BS)
            if IEEE:
                part = tl.dot(a, tl.trans(codes), input_precision="ieee")
            else:
                part = tl.dot(a, tl.trans(codes))
            acc += part * scale[None, :]
            byte = ahead
            ahead = nxt
    else:
        k_begin = pid_k.to(tl.int64) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        for k0 in range(k_begin, k_end, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=(rows < M)[:, None] & (ks < k_end)[None, :], other=0.0)
            inside = (cols < N)[:, None] & (ks < k_end)[None, :]
            flat = cols.to(tl.int64)[:, None] * K + ks[None, :]
            byte = tl.load(packed + flat // 2, mask=inside, other=0).to(tl.int32)
            nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
            scale = _block_scale(absmax, nested_code, nested_absmax, offset, flat // BLOCKSIZE, inside, NESTED, NESTED_BS)
            # the weight in x's dtype, as bitsandbytes hands it to F.linear
            w = (tl.load(quant_map + nibble) * scale).to(x.dtype.element_ty)
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)
    if SPLIT_K > 1:
        col_ok = (cols < N)[None, :]
        row_ok = (rows < M)[:, None]
        tile = partial + (pid_k * BM + rows64[:, None]) * N + cols.to(tl.int64)[None, :]
        tl.store(tile, acc, mask=row_ok & col_ok)
        # Triton orders every thread's stores before the one atomic (bar.sync), and acq_rel at gpu
        # scope publishes them to the program that sees the last count.
        done = tl.atomic_add(counters + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partial + (s * BM + rows64[:, None]) * N + cols.to(tl.int64)[None, :],
                                 mask=row_ok & col_ok, other=0.0, cache_modifier=".cg")  # fmt: skip
            tl.atomic_xchg(counters + pid_n, 0)
            _gemv_epilogue(total, rows, cols, M, N, R, scaling, bias, xa, lora_b, out,
                           stride_bias, stride_am, stride_ar, stride_bn, stride_br, stride_om, stride_on,
                           HAS_BIAS, HAS_LORA, BR)  # fmt: skip
    else:
        _gemv_epilogue(acc, rows, cols, M, N, R, scaling, bias, xa, lora_b, out,
                       stride_bias, stride_am, stride_ar, stride_bn, stride_br, stride_om, stride_on,
                       HAS_BIAS, HAS_LORA, BR)  # fmt: skip


# --- M > 16 and dX: the rank-r term cuBLAS then accumulates onto -----------------------------------


@_jit
def _expand_kernel(out, bias, left, right, mask, seed, M, N, R, scale, p,
                   stride_om, stride_on, stride_bias, stride_lm, stride_lr, stride_rn, stride_rr, stride_mm, stride_mb,
                   HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """out[M, N] = (bias) + keep * (scale * left[M, R]) @ right[N, R]^T, written once in out's dtype.

    cuBLAS then adds the base GEMM onto it (beta = 1), so the LoRA term costs one write of out
    and cuBLAS's read of it. DROPOUT: 0 none; 1 the packed keep-mask bytes of kernels.lora (bit
    i of byte b is column 8b + i); 2 the same mask drawn from `seed` element by element.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rs = r0 + tl.arange(0, BR)
        rs64 = rs.to(tl.int64)
        a = tl.load(left + rows64[:, None] * stride_lm + rs64[None, :] * stride_lr, mask=row_ok[:, None] & (rs < R)[None, :], other=0.0)
        b = tl.load(right + rs64[:, None] * stride_rr + cols64[None, :] * stride_rn, mask=(rs < R)[:, None] & col_ok[None, :], other=0.0)
        a = a.to(tl.float32) * scale
        if IEEE:
            acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(out.dtype.element_ty), b.to(out.dtype.element_ty), acc)
    if DROPOUT == 1:
        byte_cols = pid_n * (BN // 8) + tl.arange(0, BN // 8)
        packed = tl.load(mask + rows64[:, None] * stride_mm + byte_cols.to(tl.int64)[None, :] * stride_mb,
                         mask=row_ok[:, None] & (byte_cols < tl.cdiv(N, 8))[None, :], other=0)  # fmt: skip
        acc = tl.where(tl.reshape(keep_bits(packed), (BM, BN)), acc, 0.0)
    elif DROPOUT == 2:
        acc = tl.where(keep_mask(tl.load(seed), rows, cols, N, p), acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias + cols64 * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows64[:, None] * stride_om + cols64[None, :] * stride_on, acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


# --- configurations per architecture ------------------------------------------------------------
# Each entry compiles without spills and within the arch's shared memory (sm_80 163 KB, sm_86
# 99 KB, sm_90 227 KB per block) and has the MMA kind and load widths its STATIC_CASES require;
# `python -m pefomed.bench.static --only nf4` checks every one for sm_80, sm_86 and sm_90a.

# (BN, BK, num_warps) of the GEMV, widest first. BK is capped by the blocksize (ALIGNED path).
GEMV_CONFIGS: dict[int, list[tuple[int, int, int]]] = {
    90: [(128, 64, 8), (64, 64, 4)],
    80: [(128, 64, 8), (64, 64, 4)],
    86: [(128, 64, 8), (64, 64, 4)],
}
# Programs of each GEMV config resident per SM (65536 registers / (regs x threads), regs from the
# gate: 96-103 at 256 threads, 76-102 at 128): split-K fills one wave of them, no partial second.
GEMV_RESIDENT = {(128, 64, 8): 2, (64, 64, 4): 4}
# Blocks that straddle rows (K not a multiple of the blocksize) take the per-element path, whose
# index and absmax arithmetic per weight needs a narrower tile to stay in registers.
GEMV_UNALIGNED_CONFIG: tuple[int, int, int] = (32, 64, 4)
# (BM, BN, num_warps) of the rank-r expansion (memory-bound: one config).
EXPAND_CONFIGS: dict[int, tuple[int, int, int]] = {90: (64, 128, 8), 80: (64, 128, 8), 86: (64, 128, 8)}
# (GROUPS, num_warps) of the dequantization: two 16-byte groups per thread.
DEQUANT_CONFIG: tuple[int, int] = (512, 8)
# The interpreter's cost is per program and per op, not per element: small tiles keep test
# shapes spread over several programs (and split-K slices) without slowing the tests down.
_INTERPRETER = {"gemv": (32, 32, 1), "expand": (32, 32, 1), "dequant": (16, 1), "wave": 16}
GEMV_BM = 16  # M <= SMALL_M rows are padded to one MMA tile
MAX_SPLIT_K = 16


def _arch(device: torch.device) -> int:
    from pefomed.kernels.common import gate_arch

    return gate_arch(torch.cuda.get_device_capability(device))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream_key(device: torch.device) -> tuple:
    """Buffers reused across launches are per device and stream: stream order is what makes reuse safe."""
    if device.type != "cuda":
        return (device.type, device.index, 0)
    return (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)


# --- device-resident state: code tables, split-K counters, the dequantized-weight cache ----------
# Each is built once and then only read by kernels, so a call launches kernels and nothing else:
# no host sync and no allocation that depends on data, which CUDA graphs need. While a CUDA graph
# is being captured nothing is inserted (the captured kernels have not run, so a cached buffer
# would hold nothing yet for eager callers); fresh tensors from the graph's pool are used instead.

_STATE_LOCK = threading.Lock()
_TABLES: dict[tuple, tuple] = {}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def _code_table(quant_map: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 16 NF4 code values in `dtype`, cached per quant_map tensor (fp32: the tensor itself)."""
    if dtype == quant_map.dtype:
        return quant_map
    version = _version(quant_map)
    key = (id(quant_map), dtype)
    with _STATE_LOCK:
        hit = _TABLES.get(key)
        if hit is not None and hit[0]() is quant_map and hit[1] == version and version is not None:
            return hit[2]
    table = quant_map.to(dtype)  # round to nearest even, as the GPU's cvt.rn
    if version is not None and not _capturing(quant_map.device):
        with _STATE_LOCK:
            _TABLES[key] = (weakref.ref(quant_map, lambda _, key=key: _TABLES.pop(key, None)), version, table)
    return table


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for the split-K programs; every launch leaves them zero again."""
    if _capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = _stream_key(device)
    with _STATE_LOCK:
        counters = _COUNTERS.get(key)
        if counters is None or counters.numel() < n:
            counters = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            _COUNTERS[key] = counters
    return counters


class _Slot:
    """One dequantized weight: its flat buffer and what it holds (the inner tensors and versions)."""

    __slots__ = ("buffer", "refs", "versions", "layout")

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.refs: tuple = ()
        self.versions: tuple = ()
        self.layout: tuple = ()

    def holds(self, inner: tuple, layout: tuple) -> bool:
        return (
            self.layout == layout
            and len(self.refs) == len(inner)
            and all(ref() is t for ref, t in zip(self.refs, inner))
            and self.versions == tuple(_version(t) for t in inner)
        )


_CACHE: dict[tuple, list[_Slot]] = {}  # (device, stream, dtype) -> slots, least recently used first
_CACHE_BUDGET = int(float(os.environ.get("PEFOMED_NF4_CACHE_MB", "0")) * 2**20)


def set_dequant_cache_budget(nbytes: int) -> None:
    """Bytes of dequantized weights kept per device (and stream and dtype) for reuse.

    The floor is one weight: the M > 16 matmuls dequantize into a scratch buffer the size of the
    largest weight seen, reused by every layer. A larger budget keeps the most recently used
    weights too, so the backward (dX) reuses the forward's dequantization when nothing evicted it
    in between: with activation checkpointing, a budget of one transformer block's weights in the
    compute dtype (LLaMA-7B: 4 * 4096^2 + 3 * 4096 * 11008 values, 0.4 GB in bf16) makes the
    recomputed forward and the backward of each block share one dequantization. Also set by
    $PEFOMED_NF4_CACHE_MB at import.
    """
    global _CACHE_BUDGET
    if nbytes < 0:
        raise ValueError(f"kernels.nf4.set_dequant_cache_budget: nbytes must be >= 0, got {nbytes}")
    _CACHE_BUDGET = int(nbytes)
    with _STATE_LOCK:
        for slots in _CACHE.values():
            _evict(slots, 0)


def clear_dequant_cache(keep_buffers: bool = False) -> None:
    """Forget every dequantized weight. By default also free the buffers, code tables and split-K
    counters (e.g. before measuring peak memory); `keep_buffers=True` only marks the buffers empty,
    so the next call dequantizes again into the same memory, as a step's next layer would (what a
    benchmark of one layer called in a loop must do to time the dequantization it would pay)."""
    with _STATE_LOCK:
        if keep_buffers:
            for slots in _CACHE.values():
                for slot in slots:
                    slot.refs, slot.versions, slot.layout = (), (), ()
            return
        _CACHE.clear()
        _TABLES.clear()
        _COUNTERS.clear()


def _evict(slots: list[_Slot], incoming: int) -> list[_Slot]:
    """Drop least recently used slots until `incoming` more bytes fit the budget; the dropped."""
    dropped = []
    while slots and sum(s.buffer.numel() * s.buffer.element_size() for s in slots) + incoming > _CACHE_BUDGET:
        dropped.append(slots.pop(0))
    return dropped


def _dequantized(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] weight in `dtype`, for the M > 16 and dX matmuls (cuBLAS).

    It lives in a per-device buffer and stays valid until the next call on the same device and
    stream; the caller consumes it right away (stream order keeps later overwrites behind that
    use). A weight still held from an earlier call is not dequantized again: the same inner
    tensors (weak references, so a freed weight never matches) at the same version counters.
    Every write to an NF4Tensor goes through `copy_` / `zero_`, which bump them; FSDP2's
    all-gather refills a weight's own buffers without bumping them, but with that same weight's
    codes, which is what the held buffer already holds.
    """
    inner = tuple(getattr(q, name) for name in _INNER if getattr(q, name) is not None)
    layout = (tuple(q.shape), q.blocksize, q.nested_blocksize, dtype)
    n = q.numel()
    device = q.device
    if _capturing(device) or any(_version(t) is None for t in inner):
        return dequantize_nf4(q, dtype)
    key = (*_stream_key(device), dtype)
    with _STATE_LOCK:
        slots = _CACHE.setdefault(key, [])
        for i, slot in enumerate(slots):
            if slot.holds(inner, layout):
                slots.append(slots.pop(i))
                return slot.buffer[:n].view(q.shape)
        dropped = _evict(slots, n * dtype.itemsize)
        reuse = next((s for s in dropped if s.buffer.numel() >= n), None)
        slot = reuse or _Slot(_new_output((n,), dtype, device))
        slot.refs, slot.versions, slot.layout = (), (), ()  # holds nothing until the kernel is queued
        slots.append(slot)
    weight = slot.buffer[:n].view(q.shape)
    dequantize_nf4(q, dtype, out=weight)
    slot.refs = tuple(weakref.ref(t) for t in inner)
    slot.versions = tuple(_version(t) for t in inner)
    slot.layout = layout
    return weight


def _nested_args(q: NF4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nested-state pointers; the absmax stands in for them when the weight is not nested."""
    if q.nested:
        return q.nested_code, q.nested_absmax, q.offset
    return q.absmax, q.absmax, q.absmax


def _check_nf4(q: Any, what: str) -> None:
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"kernels.nf4.{what}: expected an NF4Tensor (to_nf4(w)), got {type(q).__name__}")


def _check_device(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"kernels.nf4.{what}: the Triton kernels run on CUDA tensors, got {device}; use F.linear(x, q) "
            "(the `kernels: torch` path) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def dequantize_nf4(q: NF4Tensor, out_dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full-precision weight, bit-identical to bitsandbytes' dequantize_4bit, by the Triton kernel.

    `out` (contiguous, the stored [out, in] shape) receives it. On a CPU without
    TRITON_INTERPRET=1, where Triton cannot run, this is `q.dequantize(out_dtype)`.
    """
    _check_nf4(q, "dequantize_nf4")
    out_dtype = out_dtype or q.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    shape = q._stored_shape()
    if out is not None and (out.shape != shape or out.dtype != out_dtype or not out.is_contiguous() or out.device != q.device):
        raise ValueError(f"dequantize_nf4: out must be a contiguous {out_dtype} tensor of shape {list(shape)} on {q.device}")
    if q.device.type != "cuda" and not INTERPRET:
        dense = q.dequantize(out_dtype)
        return dense if out is None else out.copy_(dense if q.is_contiguous() else dense.t())
    triton = _triton("dequantize_nf4")
    if out is None:
        out = _new_output(shape, out_dtype, q.device)
    n = out.numel()
    n_bytes = (n + 1) // 2
    groups, warps = _INTERPRETER["dequant"] if INTERPRET else DEQUANT_CONFIG
    _dequant_kernel[(triton.cdiv(triton.cdiv(n_bytes, 16), groups),)](
        q.packed, q.absmax, q.quant_map, *_nested_args(q), out, n_bytes, n,
        BLOCKSIZE=q.blocksize, NESTED=q.nested, NESTED_BS=q.nested_blocksize, GROUPS=groups,
        num_warps=warps, num_stages=1, enable_fp_fusion=False,  # bitsandbytes rounds code8 * absmax2 before adding the offset
    )  # fmt: skip
    return out if q.is_contiguous() else out.t()


# --- the matmuls --------------------------------------------------------------------------------


def _check_matmul_inputs(x: torch.Tensor, q: NF4Tensor, what: str) -> None:
    _check_nf4(q, what)
    if q.dim() != 2 or not q.is_contiguous():
        raise ValueError(f"kernels.nf4.{what}: the NF4 weight must be the 2-D [out, in] weight, got {q!r}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kernels.nf4.{what}: input dtype {x.dtype} is not float32, float16 or bfloat16")
    if x.device != q.device:
        raise ValueError(f"kernels.nf4.{what}: input on {x.device} but the NF4 weight on {q.device}; move it with q.to(device)")
    _check_device(x.device, what)


def _out_2d(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor | None:
    """`out` seen as [M, N] (any strides), or None."""
    if out is None:
        return None
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(f"kernels.nf4.{what}: out must be {dtype} of shape {list(shape)} on {device}, got {out.dtype} {list(out.shape)} on {out.device}")
    try:
        return out.view(-1, shape[-1])
    except RuntimeError as e:
        raise ValueError(f"kernels.nf4.{what}: out with strides {out.stride()} cannot be seen as a 2-D [M, {shape[-1]}] tensor; pass a 2-D out") from e


def _gemv_config(n: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, programs per wave): the widest tile that can still fill a wave."""
    if INTERPRET:
        bn, bk, warps = _INTERPRETER["gemv"]
        return bn, bk, warps, _INTERPRETER["wave"]
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    configs = GEMV_CONFIGS[_arch(device)]
    for bn, bk, warps in configs:
        wave = GEMV_RESIDENT[bn, bk, warps] * sms
        if -(n // -bn) * min(MAX_SPLIT_K, max(1, k // (2 * bk))) >= wave:
            return bn, bk, warps, wave
    bn, bk, warps = configs[-1]
    return bn, bk, warps, GEMV_RESIDENT[bn, bk, warps] * sms


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


def _gemv_split(n: int, k: int, bn: int, bk: int, wave: int) -> tuple[int, int]:
    """(SPLIT_K, K per slice): at most one wave of programs, each slice at least two tiles of K."""
    split = max(1, min(MAX_SPLIT_K, wave // _cdiv(n, bn), k // (2 * bk)))
    k_per_split = _cdiv(_cdiv(k, split), bk) * bk  # a multiple of BK: slices start on 16-byte boundaries
    return _cdiv(k, k_per_split), k_per_split


def _gemv(x2: torch.Tensor, q: NF4Tensor, bias: torch.Tensor | None, xa: torch.Tensor | None, b: torch.Tensor | None,
          scaling: float, out2: torch.Tensor) -> None:  # fmt: skip
    triton = _triton_module()
    m, k = x2.shape
    n = q.shape[0]
    bn, bk, warps, wave = _gemv_config(n, k, x2.device)
    aligned = k % q.blocksize == 0
    if aligned:
        bk = min(bk, q.blocksize)
    elif not INTERPRET:
        bn, bk, warps = GEMV_UNALIGNED_CONFIG
    n_tiles = triton.cdiv(n, bn)
    split, k_per_split = _gemv_split(n, k, bn, bk, wave)
    partial = _new_output((split, GEMV_BM, n), torch.float32, x2.device) if split > 1 else out2
    counters = _split_counters(x2.device, n_tiles) if split > 1 else out2
    r = xa.shape[1] if xa is not None else 1
    _gemv_kernel[(n_tiles, split)](
        x2, q.packed, q.absmax, q.quant_map, _code_table(q.quant_map, x2.dtype), *_nested_args(q),
        bias if bias is not None else out2, xa if xa is not None else out2, b if b is not None else out2,
        out2, partial, counters,
        m, n, k, r, float(scaling), k // 2, k_per_split, k_per_split // 2,
        x2.stride(0), x2.stride(1), bias.stride(0) if bias is not None else 0,
        xa.stride(0) if xa is not None else 0, xa.stride(1) if xa is not None else 0,
        b.stride(0) if b is not None else 0, b.stride(1) if b is not None else 0,
        out2.stride(0), out2.stride(1),
        HAS_BIAS=bias is not None, HAS_LORA=xa is not None, BLOCKSIZE=q.blocksize, NESTED=q.nested,
        NESTED_BS=q.nested_blocksize, ALIGNED=aligned, IEEE=x2.dtype == torch.float32,
        BM=GEMV_BM, BN=bn, BK=bk, BR=_rank_tile(r), SPLIT_K=split, num_warps=warps, num_stages=1,
        # the per-element path rounds the weight as bitsandbytes does; the aligned one scales fp32 sums (FMA)
        enable_fp_fusion=aligned,
    )  # fmt: skip


def _rank_tile(r: int) -> int:
    """The rank chunk of the LoRA terms: tl.dot needs >= 16 and a power of two; masks cover the rest."""
    return min(64, max(16, 1 << max(r - 1, 0).bit_length()))


def _expand(out2: torch.Tensor, bias: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor, stride_rn: int, stride_rr: int,
            scale: float, mask: torch.Tensor | None = None, seed: torch.Tensor | None = None, p: float = 0.0) -> None:  # fmt: skip
    """out2 = bias + keep * (scale * left) @ right^T, right [N, R] given by (tensor, stride_rn, stride_rr)."""
    triton = _triton_module()
    m, n = out2.shape
    r = left.shape[1]
    bm, bn, warps = _INTERPRETER["expand"] if INTERPRET else EXPAND_CONFIGS[_arch(out2.device)]
    dropout = 1 if mask is not None else 2 if seed is not None else 0
    _expand_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        out2, bias if bias is not None else out2, left, right, mask if mask is not None else left,
        seed if seed is not None else left, m, n, r, float(scale), float(p),
        out2.stride(0), out2.stride(1), bias.stride(0) if bias is not None else 0, left.stride(0), left.stride(1),
        stride_rn, stride_rr, mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        HAS_BIAS=bias is not None, DROPOUT=dropout, IEEE=out2.dtype == torch.float32, BM=bm, BN=bn, BR=_rank_tile(r),
        num_warps=warps, num_stages=1, enable_fp_fusion=False,  # one rank chunk: nothing to pipeline
    )  # fmt: skip


def nf4_matmul(
    x: torch.Tensor,
    q: NF4Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W^T + bias + scaling * lora_xa @ lora_b^T` for x [..., in], W = dequant(q) [out, in].

    M <= SMALL_M rows (decoding, evaluation) take the split-K GEMV, which reads the 4-bit weight
    once. More rows dequantize W once into the reused buffer (`_dequantized`, the compute dtype)
    and run cuBLAS; with LoRA the rank-r term (and bias) is written first and cuBLAS adds the GEMM
    onto it. `lora_xa` is [..., r] (the rank projection of x; fp32 is fine), `lora_b` [out, r].
    Any argument may have any strides; `out` ([..., out], x's dtype) receives the result.
    """
    _check_matmul_inputs(x, q, "nf4_matmul")
    n_out, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"kernels.nf4.nf4_matmul: x has {x.shape[-1]} features but the NF4 weight is {list(q.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"kernels.nf4.nf4_matmul: bias has shape {list(bias.shape)}, expected [{n_out}]")
    if (lora_xa is None) != (lora_b is None):
        raise ValueError("kernels.nf4.nf4_matmul: lora_xa and lora_b go together (both or neither)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    xa = None
    if lora_xa is not None:
        r = lora_xa.shape[-1]
        xa = lora_xa.reshape(-1, r)
        if xa.shape[0] != m or lora_b.shape != (n_out, r):
            raise ValueError(
                f"kernels.nf4.nf4_matmul: lora_xa {list(lora_xa.shape)} / lora_b {list(lora_b.shape)} do not fit "
                f"M={m}, out={n_out}; expected lora_xa [..., r] with {m} rows and lora_b [{n_out}, r]"
            )
    out2 = _out_2d(out, (*lead, n_out), x.dtype, x.device, "nf4_matmul")
    if m == 0:
        return out if out is not None else x.new_zeros((*lead, n_out))
    _triton("nf4_matmul")
    if out2 is None and (m <= SMALL_M or xa is not None):
        out2 = _new_output((m, n_out), x.dtype, x.device)
    if m <= SMALL_M:
        _gemv(x2, q, bias, xa, lora_b, scaling, out2)
    else:
        w = _dequantized(q, x.dtype)
        if xa is not None:
            _expand(out2, bias, xa, lora_b, lora_b.stride(0), lora_b.stride(1), scaling)
            out2.addmm_(x2, w.t())
        else:
            b = None if bias is None else bias.to(x.dtype)
            if out2 is None:
                out2 = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
            elif b is None:
                torch.mm(x2, w.t(), out=out2)
            else:
                torch.addmm(b, x2, w.t(), out=out2)
    return out if out is not None else out2.view(*lead, n_out)


def nf4_matmul_t(
    dy: torch.Tensor,
    q: NF4Tensor,
    *,
    lora_g: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dy @ W` for dy [..., out]: the input gradient of `x @ W^T`, in dy's dtype.

    W comes from `_dequantized` (the forward's buffer when it still holds this weight) and the
    product from cuBLAS. With `lora_g` [..., r] (fp32, `scaling * dy @ B`) and `lora_a` [r, in] it
    adds the LoRA part of dX, `keep * (lora_g @ lora_a) / (1 - dropout_p)`, where `keep` is
    kernels.lora's dropout mask over x's 2-D view: the packed bytes `mask` [M, >= ceil(in/8)]
    uint8 when given (bit i of byte b is column 8b + i), else drawn from `seed` (int64, 1 element)
    element by element. `out` ([..., in], dy's dtype, any strides) receives the result.
    """
    _check_matmul_inputs(dy, q, "nf4_matmul_t")
    n_out, k = q.shape
    if dy.shape[-1] != n_out:
        raise ValueError(f"kernels.nf4.nf4_matmul_t: dy has {dy.shape[-1]} features but the NF4 weight is {list(q.shape)}")
    if (lora_g is None) != (lora_a is None):
        raise ValueError("kernels.nf4.nf4_matmul_t: lora_g and lora_a go together (both or neither)")
    lead = dy.shape[:-1]
    d2 = dy.reshape(-1, n_out)
    m = d2.shape[0]
    g = None
    if lora_g is not None:
        r = lora_g.shape[-1]
        g = lora_g.reshape(-1, r)
        if g.shape[0] != m or lora_a.shape != (r, k):
            raise ValueError(
                f"kernels.nf4.nf4_matmul_t: lora_g {list(lora_g.shape)} / lora_a {list(lora_a.shape)} do not fit "
                f"M={m}, in={k}; expected lora_g [..., r] with {m} rows and lora_a [r, {k}]"
            )
    dropout = g is not None and dropout_p > 0
    if dropout and mask is None and seed is None:
        raise ValueError("kernels.nf4.nf4_matmul_t: dropout_p > 0 needs the forward's packed mask (mask=) or its seed (seed=)")
    if dropout and mask is not None and (mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[0] != m or mask.shape[1] * 8 < k):
        raise ValueError(
            f"kernels.nf4.nf4_matmul_t: mask must be the packed uint8 keep-mask [{m}, >= {-(k // -8)}] of x's 2-D view, "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    out2 = _out_2d(out, (*lead, k), dy.dtype, dy.device, "nf4_matmul_t")
    if m == 0:
        return out if out is not None else dy.new_zeros((*lead, k))
    _triton("nf4_matmul_t")
    if out2 is None and g is not None:
        out2 = _new_output((m, k), dy.dtype, dy.device)
    w = _dequantized(q, dy.dtype)
    if g is not None:
        # A [r, in] seen as [in, r] through strides
        _expand(out2, None, g, lora_a, lora_a.stride(1), lora_a.stride(0), 1.0 / (1.0 - dropout_p),
                mask if dropout else None, seed if dropout and mask is None else None, dropout_p)  # fmt: skip
        out2.addmm_(d2, w)
    elif out2 is None:
        out2 = torch.mm(d2, w)
    else:
        torch.mm(d2, w, out=out2)
    return out if out is not None else out2.view(*lead, k)


# --- torch.library ops and autograd -------------------------------------------------------------
# A custom op's schema holds plain tensors: the NF4Tensor travels as its inner tensors and layout
# (`nf4_op_args`), so the traced graph (where AOTAutograd unwraps subclasses) holds the op whole.


def nf4_op_args(q: NF4Tensor) -> tuple:
    """q as the `pefomed::nf4_*` ops take it: (packed, absmax, quant_map, offset, nested_absmax,
    nested_code, shape, blocksize, nested_blocksize, dtype)."""
    _check_nf4(q, "nf4_op_args")
    return (q.packed, q.absmax, q.quant_map, q.offset, q.nested_absmax, q.nested_code,
            list(q.shape), q.blocksize, q.nested_blocksize, q.dtype)  # fmt: skip


def _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype) -> NF4Tensor:
    return NF4Tensor(packed, absmax, shape, dtype, blocksize, offset, nested_absmax, nested_code, nested_blocksize, quant_map)


@torch.library.custom_op("pefomed::nf4_dequantize", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int], blocksize: int,
    nested_blocksize: int, dtype: torch.dtype, out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return dequantize_nf4(q, out_dtype)


@_dequantize_op.register_fake
def _(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype, out_dtype):
    return packed.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("pefomed::nf4_linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int], blocksize: int,
    nested_blocksize: int, dtype: torch.dtype, bias: torch.Tensor | None, lora_xa: torch.Tensor | None,
    lora_b: torch.Tensor | None, scaling: float,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return nf4_matmul(x, q, bias, lora_xa=lora_xa, lora_b=lora_b, scaling=scaling)


@_linear_op.register_fake
def _(x, packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype,
      bias, lora_xa, lora_b, scaling):  # fmt: skip
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("pefomed::nf4_matmul_t", mutates_args=())
def _matmul_t_op(
    dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int], blocksize: int,
    nested_blocksize: int, dtype: torch.dtype, lora_g: torch.Tensor | None, lora_a: torch.Tensor | None,
    seed: torch.Tensor | None, dropout_p: float, mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return nf4_matmul_t(dy, q, lora_g=lora_g, lora_a=lora_a, seed=seed, dropout_p=dropout_p, mask=mask)


@_matmul_t_op.register_fake
def _(dy, packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype,
      lora_g, lora_a, seed, dropout_p, mask=None):  # fmt: skip
    return dy.new_empty((*dy.shape[:-1], shape[1]))


def _linear_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _x, *weight, bias, lora_xa, lora_b, scaling = inputs
    ctx.save_for_backward(*weight[:6], lora_xa, lora_b)
    ctx.layout = weight[6:]
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    need = ctx.needs_input_grad
    *weight, lora_xa, lora_b = ctx.saved_tensors
    dx = torch.ops.pefomed.nf4_matmul_t(dy, *weight, *ctx.layout, None, None, None, 0.0) if need[0] else None
    dy2 = dy.reshape(-1, dy.shape[-1])
    dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need[11] else None
    d_xa = d_b = None
    if need[12] or need[13]:
        dy32 = dy2.float()
        if need[12]:
            d_xa = (ctx.scaling * dy32 @ lora_b.float()).to(lora_xa.dtype).reshape(lora_xa.shape)
        if need[13]:
            d_b = (ctx.scaling * dy32.t() @ lora_xa.reshape(-1, lora_xa.shape[-1]).float()).to(lora_b.dtype)
    return (dx, *([None] * 10), dbias, d_xa, d_b, None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def nf4_linear(
    x: torch.Tensor,
    q: NF4Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`x @ dequant(q)^T + bias (+ scaling * lora_xa @ lora_b^T)` with backward to x, bias and the
    LoRA operands; the NF4 weight gets no grad."""
    _check_nf4(q, "nf4_linear")
    return torch.ops.pefomed.nf4_linear(x, *nf4_op_args(q), bias, lora_xa, lora_b, float(scaling))


def nf4_dequantize(q: NF4Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_nf4` as a custom op: opaque to torch.compile, which traces it without a graph break."""
    _check_nf4(q, "nf4_dequantize")
    return torch.ops.pefomed.nf4_dequantize(*nf4_op_args(q), out_dtype or q.dtype)


# --- the compile gate (bench/static.py) ----------------------------------------------------------


def STATIC_CASES() -> list:
    """Every kernel as the launchers above compile it, at LLaMA-7B shapes with the engine's dtypes
    (bf16 activations, fp32 xa / g, uint8 NF4 codes with double quantization)."""
    from pefomed.bench.static import Ptr, StaticCase

    triton = _triton_module()
    bf16, f32, u8, i64 = torch.bfloat16, torch.float32, torch.uint8, torch.int64
    m, n, k, r = 8192, 4096, 4096, 64
    quant = {"packed": Ptr(u8), "absmax": Ptr(u8), "quant_map": Ptr(f32), "nested_code": Ptr(f32),
             "nested_absmax": Ptr(f32), "offset": Ptr(f32)}  # fmt: skip
    nested = {"BLOCKSIZE": 64, "NESTED": True, "NESTED_BS": 256}
    groups, warps = DEQUANT_CONFIG
    cases = [
        StaticCase(
            name=f"nf4.dequant.{name}",
            kernel=lambda: _dequant_kernel,
            args={**quant, "absmax": Ptr(u8 if is_nested else f32), "out": Ptr(dtype), "n_bytes": n * k // 2, "n": n * k,
                  "BLOCKSIZE": 64, "NESTED": is_nested, "NESTED_BS": 256, "enable_fp_fusion": False},  # fmt: skip
            configs=[triton.Config({"GROUPS": groups}, num_warps=warps, num_stages=1)],
            streaming=True,
        )
        for name, dtype, is_nested in (("bf16", bf16, True), ("fp16.plain", torch.float16, False))
    ]

    def gemv_configs(arch: int, aligned: bool = True) -> list:
        tiles = GEMV_CONFIGS[arch] if aligned else [GEMV_UNALIGNED_CONFIG]
        return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=1) for bn, bk, w in tiles]

    lora = {"xa": Ptr(f32), "lora_b": Ptr(bf16), "R": r, "stride_am": r, "stride_ar": 1, "stride_bn": r, "stride_br": 1, "BR": r}
    no_lora = {"xa": Ptr(bf16), "lora_b": Ptr(bf16), "R": 1, "stride_am": 0, "stride_ar": 0, "stride_bn": 0, "stride_br": 0, "BR": 16}
    for name, rows, cols, extra, split, aligned, streaming in (
        ("m1", 1, k, no_lora, 16, True, True),
        ("m16.lora.bias", 16, k, lora, 16, True, True),
        ("m16.down_proj", 16, 11008, no_lora, 16, True, True),
        ("m4.unaligned", 4, 4000, no_lora, 8, False, False),  # blocks straddle rows: per-element path
    ):
        k_split = _cdiv(_cdiv(cols, split), 64) * 64  # as _gemv_split rounds it
        cases.append(
            StaticCase(
                name=f"nf4.gemv.{name}",
                kernel=lambda: _gemv_kernel,
                args={
                    "x": Ptr(bf16), **quant, "table": Ptr(bf16), "bias": Ptr(bf16), **extra, "out": Ptr(bf16),
                    "partial": Ptr(f32), "counters": Ptr(torch.int32),
                    "M": rows, "N": n, "K": cols, "scaling": 0.25, "row_bytes": cols // 2,
                    "k_per_split": k_split, "split_bytes": k_split // 2,
                    "stride_xm": cols, "stride_xk": 1, "stride_bias": 1, "stride_om": n, "stride_on": 1,
                    "HAS_BIAS": name.endswith("bias"), "HAS_LORA": extra is lora, **nested, "ALIGNED": aligned,
                    "IEEE": False, "BM": GEMV_BM, "SPLIT_K": split, "enable_fp_fusion": aligned,
                },
                configs=functools.partial(gemv_configs, aligned=aligned),
                mma="bf16",
                streaming=streaming,
            )
        )  # fmt: skip
    bm, bn, warps = EXPAND_CONFIGS[90]
    for name, dropout, cols, left_stride, right_strides in (
        ("fwd.bias", 0, n, r, (r, 1)),  # y = bias + xa B^T, B [out, r]
        ("dx.mask", 1, k, r, (1, k)),  # dX term: keep * (g A) / (1-p), A [r, in] seen as [in, r]
        ("dx.seed", 2, k, r, (1, k)),
    ):
        cases.append(
            StaticCase(
                name=f"nf4.expand.{name}",
                kernel=lambda: _expand_kernel,
                args={
                    "out": Ptr(bf16), "bias": Ptr(bf16), "left": Ptr(f32), "right": Ptr(bf16), "mask": Ptr(u8),
                    "seed": Ptr(i64), "M": m, "N": cols, "R": r, "scale": 1.0 / 0.95, "p": 0.05,
                    "stride_om": cols, "stride_on": 1, "stride_bias": 1, "stride_lm": left_stride, "stride_lr": 1,
                    "stride_rn": right_strides[0], "stride_rr": right_strides[1], "stride_mm": -(-cols // 128) * 16, "stride_mb": 1,
                    "HAS_BIAS": dropout == 0, "DROPOUT": dropout, "IEEE": False, "BR": r, "enable_fp_fusion": False,
                },
                configs=lambda arch: [triton.Config({"BM": EXPAND_CONFIGS[arch][0], "BN": EXPAND_CONFIGS[arch][1]},
                                                    num_warps=EXPAND_CONFIGS[arch][2], num_stages=1)],  # fmt: skip
                mma="bf16",
            )
        )  # fmt: skip
    return cases


# --- `python -m pefomed.kernels.nf4`: what the GPU runs per weight, from the compiled SASS ---------


def sass_report(arch: int = 80, only: str = "") -> list[dict[str, Any]]:
    """Per STATIC_CASES entry (first config of `arch`): registers, shared memory and the SASS
    instructions per value a thread handles: in the GEMV's K loop (per weight value of one
    iteration), in the whole dequantization kernel (per weight value), in the whole expansion
    kernel (per output value). Needs Triton's nvdisasm, not a GPU."""
    import collections
    import re
    import subprocess
    import tempfile

    from pefomed.bench.static import _prepare, _run_ptxas, case_configs, parse_ptxas

    triton = _triton_module()
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    rows = []
    for case in STATIC_CASES():
        if only not in case.name:
            continue
        cfg = case_configs(case, arch)[0]
        _fn, target, src, options, _key = _prepare(case, cfg, arch)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        labels, pending, code = {}, [], []
        for line in sass.splitlines():
            line = line.strip()
            if m := re.match(r"(\.L_x_\d+):", line):
                pending.append(m.group(1))
            elif m := re.match(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line):
                addr = int(m.group(1), 16)
                labels.update(dict.fromkeys(pending, addr))
                pending = []
                code.append((addr, re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).split()[0]))
        back = []
        for line in sass.splitlines():
            if m := re.search(r"/\*([0-9a-f]+)\*/.*BRA\s+`?\(?(\.L_x_\d+)", line):
                target_addr = labels.get(m.group(2))
                if target_addr is not None and target_addr < int(m.group(1), 16):
                    back.append((target_addr, int(m.group(1), 16)))
        # the GEMV's per-weight work is its K loop; the expansion's loop is over rank chunks (one at
        # r <= 64), so it and the dequantization count their whole kernel
        back = back if "gemv" in case.name else []
        lo, hi = min(back, key=lambda span: span[1] - span[0]) if back else (0, code[-1][0])
        hist = collections.Counter(op for addr, op in code if lo <= addr <= hi)
        meta = {**case.args, **cfg.all_kwargs()}
        threads = 32 * cfg.num_warps
        if "GROUPS" in meta:
            values = 32 * meta["GROUPS"] / threads
        elif "BK" in meta:
            values = meta["BN"] * min(meta["BK"], meta["BLOCKSIZE"]) / threads
        else:
            values = meta["BM"] * meta["BN"] / threads  # outputs written, for the expansion
        ptxas = parse_ptxas(_run_ptxas(compiled.asm["ptx"], arch))
        rows.append({
            "case": case.name, "config": str(cfg.all_kwargs()), "regs": ptxas["regs"],
            "smem": int(compiled.metadata.shared) + ptxas["smem_static"], "loop": "yes" if back else "whole kernel",
            "instructions": sum(hist.values()), "values_per_thread": values,
            "per_value": round(sum(hist.values()) / values, 2),
            "top": dict(hist.most_common(8)),
        })  # fmt: skip
    return rows


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import subprocess
    import sys

    parser = argparse.ArgumentParser(prog="python -m pefomed.kernels.nf4", description=sass_report.__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=80, choices=(80, 86, 90))
    parser.add_argument("--only", default="", help="cases whose name contains this")
    args = parser.parse_args(argv)
    if INTERPRET:  # the interpreter replaces the kernels this compiles
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "pefomed.kernels.nf4", *(argv or sys.argv[1:])], env=env)
    for row in sass_report(args.arch, args.only):
        print(
            f"{row['case']:<26} sm_{args.arch} regs {row['regs']:>3} smem {row['smem'] / 1024:5.1f} KB  "
            f"{row['loop']:<12} {row['instructions']:>4} SASS for {row['values_per_thread']:g} values/thread "
            f"= {row['per_value']:5.2f}/value  {row['top']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
