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
`bitsandbytes.functional.dequantize_4bit` for fp32, fp16 and bf16 outputs (the Triton kernel
rounds bf16 on the bits because the interpreter truncates).

Matmul: `nf4_matmul(x, q, bias, lora_xa=, lora_b=, scaling=)` computes
`x @ W^T + bias + scaling * lora_xa @ lora_b^T` with W dequantized in registers from the packed
bytes; M <= 16 (decode, evaluation) runs a GEMV-like kernel that reads each weight byte once and
reduces on CUDA cores, larger M a tiled GEMM (fp32 accumulator, grouped tile order) whose W-tile
loader dequantizes inside the K loop. `nf4_matmul_t(dy, q, lora_g=, lora_a=, seed=, dropout_p=)`
is `dy @ W` for the backward, plus the LoRA part of dX (`keep * (g @ A) / (1 - p)`, the dropout
mask of `kernels.lora`) in its epilogue. The `torch.library` custom ops `pefomed::nf4_linear`
(with autograd), `pefomed::nf4_matmul_t` and `pefomed::nf4_dequantize` take the NF4Tensor as its
inner tensors and layout (`nf4_op_args`), so torch.compile traces them whole; `kernels.lora`
runs QLoRA through them.

Importing this module does not import Triton: the kernels below are plain functions until the
first launch jit-compiles them (`_triton`), so the tensor subclass and its torch path run where
Triton is not installed.
"""

from __future__ import annotations

import functools
import json
import math
import os
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
    return dst


@_implements(aten.zero_.default)
def _zero_(func: Any, args: tuple, kwargs: dict) -> NF4Tensor:
    args[0].packed.fill_(_ZERO_BYTE)  # the zero code is 0.0 whatever the block's absmax
    return args[0]


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
            q.nested_code.to(device, copy=True), q.nested_blocksize, q.quant_map.to(device, copy=True),
        )  # fmt: skip
    absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
    return NF4Tensor(packed, absmax, shape, dtype, q.blocksize, quant_map=q.quant_map.to(device, copy=True))


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
# The kernels' bodies name `tl`, `dot_acc`, `keep_mask` and each other as module globals; `_triton`
# binds them and replaces each `@_jit` function by its `triton.jit` on the first launch.

tl: ModuleType | None = None
dot_acc: Callable | None = None  # kernels.common's, bound with tl
keep_mask: Callable | None = None
_TRITON_FUNCTIONS: list[str] = []


def _jit(fn: Callable) -> Callable:
    """Register `fn` as a Triton kernel, compiled with `triton.jit` by `_triton()`."""
    _TRITON_FUNCTIONS.append(fn.__name__)
    return fn


@functools.cache
def _triton_module() -> ModuleType:
    import triton
    import triton.language as language

    from pefomed.kernels.common import dot_acc, keep_mask

    names = globals()
    names.update(tl=language, dot_acc=dot_acc, keep_mask=keep_mask, _SOFT_BF16=language.constexpr(INTERPRET))
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


@_jit
def _round_to_bf16(v):
    """fp32 -> bf16 with round-to-nearest-even on the bits (the interpreter's cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


_SOFT_BF16 = INTERPRET  # a tl.constexpr once `_triton` runs


@_jit
def _cast(v, dtype: tl.constexpr):
    """Round-to-nearest-even cast of fp32 `v` (GPUs convert natively; the interpreter gets the bit version)."""
    if _SOFT_BF16 and dtype == tl.bfloat16:
        return _round_to_bf16(v)
    else:
        return v.to(dtype)


@_jit
def _w_tile(packed, absmax, quant_map, nested_code, nested_absmax, offset, ns, k0, N, K,
            BK: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr,
            PAIRED: tl.constexpr):  # fmt: skip
    """Dequantized fp32 W[ns, k0:k0+BK] (W is [N, K] row-major), zero outside W.

    PAIRED (K and k0 even): every byte holds two neighbours of one row, so the tile is read as
    BK/2 bytes per row, once, and the two nibbles are interleaved in registers. Otherwise (odd K)
    bytes straddle rows and each element finds its own nibble.
    """
    rows = ns.to(tl.int64)
    if PAIRED:
        half = k0 // 2 + tl.arange(0, BK // 2)
        mask = (ns[:, None] < N) & (half[None, :] < K // 2)
        byte_idx = rows[:, None] * (K // 2) + half[None, :]
        byte = tl.load(packed + byte_idx, mask=mask, other=0).to(tl.int32)
        scale = _block_scale(absmax, nested_code, nested_absmax, offset, (byte_idx * 2) // BLOCKSIZE, mask, NESTED, NESTED_BS)
        hi = tl.load(quant_map + (byte >> 4)) * scale
        lo = tl.load(quant_map + (byte & 15)) * scale
        w = tl.interleave(hi, lo)
    else:
        ks = k0 + tl.arange(0, BK)
        mask = (ns[:, None] < N) & (ks[None, :] < K)
        flat = rows[:, None] * K + ks[None, :]
        byte = tl.load(packed + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        scale = _block_scale(absmax, nested_code, nested_absmax, offset, flat // BLOCKSIZE, mask, NESTED, NESTED_BS)
        w = tl.load(quant_map + nibble) * scale
    return w


@_jit
def _lora_product(left, right, rows, cols, M, N, R, stride_lm, stride_rn, stride_rr,
                  BR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """fp32 left[rows] @ right[cols]^T, with left [M, R] (unit stride in r) and right seen as [N, R]
    through (stride_rn, stride_rr); the rank dimension in chunks of BR."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rs = r0 + tl.arange(0, BR)
        a = tl.load(left + rows[:, None] * stride_lm + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        b = tl.load(right + cols[:, None] * stride_rn + rs[None, :] * stride_rr,
                    mask=(cols[:, None] < N) & (rs[None, :] < R), other=0.0)  # fmt: skip
        if USE_DOT:
            acc = dot_acc(acc, a.to(tl.float32), tl.trans(b.to(tl.float32)), IEEE)
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return acc


# --- dequantization -----------------------------------------------------------------------------


@_jit
def _dequant_kernel(packed, absmax, quant_map, nested_code, nested_absmax, offset, out, n,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
    """One program per BYTES packed bytes: out[2j] from the high nibble of byte j, out[2j+1] the low."""
    j = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = j < (n + 1) // 2
    byte = tl.load(packed + j, mask=mask, other=0).to(tl.int32)
    # blocksize is even, so both nibbles of a byte share a block
    scale = _block_scale(absmax, nested_code, nested_absmax, offset, (2 * j) // BLOCKSIZE, mask, NESTED, NESTED_BS)
    hi = _cast(tl.load(quant_map + (byte >> 4)) * scale, out.dtype.element_ty)
    lo = _cast(tl.load(quant_map + (byte & 15)) * scale, out.dtype.element_ty)
    idx = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out + idx, tl.interleave(hi, lo), mask=idx < n)


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


def dequantize_nf4(q: NF4Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight, bit-identical to bitsandbytes' dequantize_4bit, by the Triton kernel.

    On a CPU without TRITON_INTERPRET=1, where Triton cannot run, this is `q.dequantize(out_dtype)`.
    """
    _check_nf4(q, "dequantize_nf4")
    out_dtype = out_dtype or q.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    if q.device.type != "cuda" and not INTERPRET:
        return q.dequantize(out_dtype)
    triton = _triton("dequantize_nf4")
    out = _new_output(q._stored_shape(), out_dtype, q.device)
    n = out.numel()
    bytes_per_program = 1024
    _dequant_kernel[(triton.cdiv((n + 1) // 2, bytes_per_program),)](
        q.packed, q.absmax, q.quant_map, *_nested_args(q), out, n,
        BLOCKSIZE=q.blocksize, NESTED=q.nested, NESTED_BS=q.nested_blocksize, BYTES=bytes_per_program,
        enable_fp_fusion=False,  # bitsandbytes rounds code8 * absmax2 before adding the offset
    )  # fmt: skip
    return out if q.is_contiguous() else out.t()


# --- fused dequant + matmul ---------------------------------------------------------------------


@_jit
def _nf4_gemv_kernel(x, packed, absmax, quant_map, nested_code, nested_absmax, offset, bias, xa, lora_b, out,
                     M, N, K, R, scaling, stride_xm, stride_am, stride_bn, stride_om,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     NESTED_BS: tl.constexpr, PAIRED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """out[:M] = x @ W^T (+ bias) (+ lora) for M <= BM <= 16: each program owns BN output
    features, reads their packed bytes once over the whole K and reduces all M rows on CUDA cores."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, BM)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        w = _w_tile(packed, absmax, quant_map, nested_code, nested_absmax, offset, cols, k0, N, K,
                    BK, BLOCKSIZE, NESTED, NESTED_BS, PAIRED)  # fmt: skip
        w = _cast(w, x.dtype.element_ty).to(tl.float32)  # the weight in the compute dtype, as bitsandbytes hands it to F.linear
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc += scaling * _lora_product(xa, lora_b, rows, cols, M, N, R, stride_am, stride_bn, 1, BR, False, False)
    tl.store(out + rows[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@_jit
def _grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) in grouped order: GROUP_M row tiles sweep the columns together (L2 reuse)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@_jit
def _nf4_gemm_kernel(x, packed, absmax, quant_map, nested_code, nested_absmax, offset, bias, xa, lora_b, out,
                     M, N, K, R, scaling, stride_xm, stride_am, stride_bn, stride_om,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                     NESTED_BS: tl.constexpr, PAIRED: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """out = x @ W^T (+ bias) (+ lora): tiled GEMM, W tiles dequantized in the K loop, fp32 accumulator."""
    pid_m, pid_n = _grouped_tile(M, N, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    x_rows = x + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x_rows + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = _w_tile(packed, absmax, quant_map, nested_code, nested_absmax, offset, cols, k0, N, K,
                    BK, BLOCKSIZE, NESTED, NESTED_BS, PAIRED)  # fmt: skip
        acc = dot_acc(acc, a, tl.trans(_cast(w, x.dtype.element_ty)), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        acc += scaling * _lora_product(xa, lora_b, rows, cols, M, N, R, stride_am, stride_bn, 1, BR, True, IEEE)
    out_ptrs = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@_jit
def _nf4_gemm_t_kernel(dy, packed, absmax, quant_map, nested_code, nested_absmax, offset, g, lora_a, seed, out,
                       M, N, K, R, stride_dm, stride_gm, stride_ar, stride_om, keep_scale, p,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, PAIRED: tl.constexpr,
                       HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """out[M, K] = dy[M, N] @ W[N, K] (+ keep * keep_scale * g @ A): each program owns a [BM, BK]
    tile and walks N, W tiles dequantized in the loop; the LoRA part of dX (mask of kernels.lora) in the epilogue."""
    pid_m, pid_k = _grouped_tile(M, K, BM, BK, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    ks = k0 + tl.arange(0, BK)
    dy_rows = dy + rows.to(tl.int64)[:, None] * stride_dm
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        d = tl.load(dy_rows + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        w = _w_tile(packed, absmax, quant_map, nested_code, nested_absmax, offset, ns, k0, N, K,
                    BK, BLOCKSIZE, NESTED, NESTED_BS, PAIRED)  # fmt: skip
        acc = dot_acc(acc, d, _cast(w, dy.dtype.element_ty), IEEE)
    if HAS_LORA:
        # A is [R, K] with unit stride in K: seen as [K, R] it has strides (1, stride_ar)
        lora = _lora_product(g, lora_a, rows, ks, M, K, R, stride_gm, 1, stride_ar, BR, True, IEEE)
        if DROPOUT:
            lora = tl.where(keep_mask(tl.load(seed), rows, ks, K, p), lora, 0.0)
        acc += keep_scale * lora
    out_ptrs = out + rows.to(tl.int64)[:, None] * stride_om + ks[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (ks[None, :] < K))


GROUP_M = 2 if INTERPRET else 8  # small in the interpreter so that test shapes span several groups


def _gemm_tiles() -> tuple[int, int, int]:
    """(BM, BN, BK); the interpreter's cost is per op, not per element, hence its 32-wide tiles."""
    return (32, 32, 32) if INTERPRET else (64, 128, 64)


def _gemv_tiles(bm: int) -> tuple[int, int]:
    """(BN, BK) keeping the [BM, BN, BK] product tile at 8192 fp32 (64 registers a thread at 4 warps)."""
    if INTERPRET:
        return 32, 64
    bk = max(16, 256 // bm)
    return 8192 // (bm * bk), bk


def _rank_tile(triton: ModuleType, r: int) -> int:
    """The rank chunk of the LoRA epilogues: tl.dot needs >= 16 and a power of two; masks cover the rest."""
    return min(64, max(16, triton.next_power_of_2(r)))


def _check_matmul_inputs(x: torch.Tensor, q: NF4Tensor, what: str) -> None:
    _check_nf4(q, what)
    if q.dim() != 2 or not q.is_contiguous():
        raise ValueError(f"kernels.nf4.{what}: the NF4 weight must be the 2-D [out, in] weight, got {q!r}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kernels.nf4.{what}: input dtype {x.dtype} is not float32, float16 or bfloat16")
    if x.device != q.device:
        raise ValueError(f"kernels.nf4.{what}: input on {x.device} but the NF4 weight on {q.device}; move it with q.to(device)")
    _check_device(x.device, what)


def nf4_matmul(
    x: torch.Tensor,
    q: NF4Tensor,
    bias: torch.Tensor | None = None,
    *,
    lora_xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`x @ W^T + bias + scaling * lora_xa @ lora_b^T` for x [..., in], W = dequant(q) [out, in].

    W is used in x's dtype, as bitsandbytes hands it to F.linear. `lora_xa` is [..., r] (the rank
    projection of x; fp32 is fine), `lora_b` [out, r]. The output has x's dtype. M <= 16 rows take
    the GEMV-like kernel, more rows the tiled GEMM.
    """
    _check_matmul_inputs(x, q, "nf4_matmul")
    triton = _triton("nf4_matmul")
    n_out, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"kernels.nf4.nf4_matmul: x has {x.shape[-1]} features but the NF4 weight is {list(q.shape)}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"kernels.nf4.nf4_matmul: bias has shape {list(bias.shape)}, expected [{n_out}]")
    if (lora_xa is None) != (lora_b is None):
        raise ValueError("kernels.nf4.nf4_matmul: lora_xa and lora_b go together (both or neither)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    has_lora = lora_xa is not None
    if has_lora:
        r = lora_xa.shape[-1]
        xa = lora_xa.reshape(-1, r).contiguous()
        if xa.shape[0] != m or lora_b.shape != (n_out, r):
            raise ValueError(
                f"kernels.nf4.nf4_matmul: lora_xa {list(lora_xa.shape)} / lora_b {list(lora_b.shape)} do not fit "
                f"M={m}, out={n_out}; expected lora_xa [..., r] with {m} rows and lora_b [{n_out}, r]"
            )
        b = lora_b.contiguous()
    else:
        r, xa, b = 1, x2, x2
    out = _new_output((m, n_out), x.dtype, x.device)
    if m == 0:
        return out.reshape(*lead, n_out)
    args = (
        x2, q.packed, q.absmax, q.quant_map, *_nested_args(q), bias if bias is not None else x2, xa, b, out,
        m, n_out, k, r, float(scaling), x2.stride(0), xa.stride(0), b.stride(0), out.stride(0),
    )  # fmt: skip
    common = {
        "HAS_BIAS": bias is not None, "HAS_LORA": has_lora, "BLOCKSIZE": q.blocksize, "NESTED": q.nested,
        "NESTED_BS": q.nested_blocksize, "PAIRED": k % 2 == 0, "BR": _rank_tile(triton, r),
        "enable_fp_fusion": False,  # the weight's absmax is rebuilt with bitsandbytes' separate roundings
    }  # fmt: skip
    if m <= SMALL_M:
        bm = max(1, triton.next_power_of_2(m))
        bn, bk = _gemv_tiles(bm)
        _nf4_gemv_kernel[(triton.cdiv(n_out, bn),)](*args, **common, BM=bm, BN=bn, BK=bk)
    else:
        bm, bn, bk = _gemm_tiles()
        grid = (triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)
        _nf4_gemm_kernel[grid](*args, **common, IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M)
    return out.reshape(*lead, n_out)


def nf4_matmul_t(
    dy: torch.Tensor,
    q: NF4Tensor,
    *,
    lora_g: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`dy @ W` for dy [..., out]: the input gradient of `x @ W^T`, in dy's dtype.

    With `lora_g` [..., r] (fp32, `scaling * dy @ B`) and `lora_a` [r, in] it adds the LoRA part of
    dX, `keep * (lora_g @ lora_a) / (1 - dropout_p)`, where `keep` is `kernels.lora`'s dropout mask
    for `seed` (int64, 1 element; needed when dropout_p > 0) over x's 2-D view.
    """
    _check_matmul_inputs(dy, q, "nf4_matmul_t")
    triton = _triton("nf4_matmul_t")
    n_out, k = q.shape
    if dy.shape[-1] != n_out:
        raise ValueError(f"kernels.nf4.nf4_matmul_t: dy has {dy.shape[-1]} features but the NF4 weight is {list(q.shape)}")
    if (lora_g is None) != (lora_a is None):
        raise ValueError("kernels.nf4.nf4_matmul_t: lora_g and lora_a go together (both or neither)")
    if dropout_p > 0 and seed is None:
        raise ValueError("kernels.nf4.nf4_matmul_t: dropout_p > 0 needs the seed tensor of the forward's dropout")
    lead = dy.shape[:-1]
    d = dy.reshape(-1, n_out).contiguous()
    m = d.shape[0]
    has_lora = lora_g is not None
    if has_lora:
        r = lora_g.shape[-1]
        g = lora_g.reshape(-1, r).contiguous()
        a = lora_a.contiguous()
        if g.shape[0] != m or a.shape != (r, k):
            raise ValueError(
                f"kernels.nf4.nf4_matmul_t: lora_g {list(lora_g.shape)} / lora_a {list(lora_a.shape)} do not fit "
                f"M={m}, in={k}; expected lora_g [..., r] with {m} rows and lora_a [r, {k}]"
            )
    else:
        r, g, a = 1, d, d
    dropout = has_lora and dropout_p > 0
    out = _new_output((m, k), dy.dtype, dy.device)
    if m == 0:
        return out.reshape(*lead, k)
    bm, bn, bk = _gemm_tiles()
    if not INTERPRET and m <= SMALL_M:
        bm = 16
    _nf4_gemm_t_kernel[(triton.cdiv(m, bm) * triton.cdiv(k, bk),)](
        d, q.packed, q.absmax, q.quant_map, *_nested_args(q), g, a, seed if dropout else d, out,
        m, n_out, k, r, d.stride(0), g.stride(0), a.stride(0), out.stride(0), 1.0 / (1.0 - dropout_p), float(dropout_p),
        BLOCKSIZE=q.blocksize, NESTED=q.nested, NESTED_BS=q.nested_blocksize, PAIRED=k % 2 == 0,
        HAS_LORA=has_lora, DROPOUT=dropout, IEEE=dy.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, BR=_rank_tile(triton, r), GROUP_M=GROUP_M, enable_fp_fusion=False,
    )  # fmt: skip
    return out.reshape(*lead, k)


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
    seed: torch.Tensor | None, dropout_p: float,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return nf4_matmul_t(dy, q, lora_g=lora_g, lora_a=lora_a, seed=seed, dropout_p=dropout_p)


@_matmul_t_op.register_fake
def _(dy, packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype,
      lora_g, lora_a, seed, dropout_p):  # fmt: skip
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
    dy2 = dy.reshape(-1, dy.shape[-1]).float()
    dbias = dy2.sum(0).to(ctx.bias_dtype) if need[11] else None
    d_xa = (ctx.scaling * dy2 @ lora_b.float()).to(lora_xa.dtype).reshape(lora_xa.shape) if need[12] else None
    d_b = (ctx.scaling * dy2.t() @ lora_xa.reshape(-1, lora_xa.shape[-1]).float()).to(lora_b.dtype) if need[13] else None
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
