"""4-bit NF4 weights in bitsandbytes' format: quantize, dequantize (Triton), fused dequant-matmul.

Format (bitsandbytes 0.50 `quantize_4bit(..., quant_type="nf4")`): the weight is flattened
row-major and cut into blocks of `blocksize` (64) values, which may straddle rows. Each block is
scaled by `1 / absmax` into [-1, 1] and each value takes the index of the nearest of the 16 NF4
code values (ties to the lower code); two 4-bit codes share a byte, the even element in the high
nibble; the bytes are stored as a `[ceil(n/2), 1]` uint8 tensor. With double quantization
(`compress_statistics`) the fp32 absmax vector is centred on its mean (`offset`) and quantized
blockwise (blocks of 256) to 8 bits with bitsandbytes' signed dynamic map; `nested_absmax`
holds one fp32 scale per 256-block.

Bit-exactness: `quantize_nf4` reproduces bitsandbytes' CPU backend byte for byte, including its
C++ 8-bit quantizer (a 65536-entry look-up table over [-1, 1], not exact nearest rounding) and
the stored absmax of an all-zero tail block (clamped to 1e-38). Dequantization is
`quant_map[code] * absmax` in fp32 with the nested absmax rebuilt as
`nested_code[q] * nested_absmax + offset` (two separately rounded fp32 ops, so the kernels are
compiled without FMA contraction), then one round-to-nearest-even cast: the Triton kernel is
bit-identical to `bitsandbytes.functional.dequantize_4bit` for fp32, fp16 and bf16 outputs
(the bf16 rounding is done on the bits because the Triton interpreter truncates).

Matmul: `nf4_matmul(x, q, bias, lora_xa=, lora_b=, scaling=)` computes
`x @ W^T + bias + scaling * lora_xa @ lora_b^T` with W dequantized in registers from the packed
bytes; M <= 16 (decode, evaluation) runs a GEMV-like kernel that reads each weight byte once and
reduces on CUDA cores, larger M a tiled GEMM (fp32 accumulator, grouped tile order) whose W-tile
loader dequantizes inside the K loop. `nf4_matmul_t(dy, q)` is `dy @ W` for the backward.
`nf4_linear` is the autograd entry point, a `torch.library` custom op (`pefomed::nf4_linear`,
with `pefomed::nf4_dequantize` and `pefomed::nf4_matmul_t`) so `torch.compile` traces it whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from pefomed.kernels.common import dot_acc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

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
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer discretizes [-1, 1] into this many bins
_STATE_KEY = "quant_state.bitsandbytes__nf4"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    """NF4_CODE on `device`, copied there once (weights are rebuilt inside every custom-op call)."""
    if device not in _CODES:
        _CODES[device] = NF4_CODE.to(device)
    return _CODES[device]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- the weight ---------------------------------------------------------------------------------


@dataclass
class NF4Weight:
    """A frozen weight stored as NF4 in bitsandbytes' layout; not a tensor and not a module.

    The positional field order is part of the contract with `kernels.lora` (which rebuilds the
    weight inside its custom ops). A module holds it as a plain attribute; `register_nf4_weight`
    adds the state-dict hooks that save and load it in `bnb.nn.Linear4bit`'s format.
    """

    packed: torch.Tensor  # uint8 [ceil(n/2), 1], high nibble first
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 codes into nested_code when nested
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype of the weight before quantization (the default output dtype)
    blocksize: int = 64
    offset: torch.Tensor | None = None  # fp32 0-d: the mean subtracted before the nested quantization
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)]
    nested_code: torch.Tensor | None = None  # fp32 [256]: the dynamic map
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_map: torch.Tensor | None = None  # fp32 [16]: the NF4 code values (filled in when None)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.quant_map is None:
            self.quant_map = _nf4_code_on(self.packed.device)
        self._validate()

    def _validate(self) -> None:
        n = _numel(self.shape)
        where = f"NF4Weight(shape={list(self.shape)})"
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
            if self.nested_absmax.numel() != expected or self.nested_code.numel() != 256:
                raise ValueError(
                    f"{where}: nested_absmax needs {expected} entries (one per {self.nested_blocksize} blocks) and "
                    f"nested_code 256, got {self.nested_absmax.numel()} and {self.nested_code.numel()}"
                )
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"{where}: absmax must be float32, got {self.absmax.dtype}")
        if self.quant_map.numel() != 16:
            raise ValueError(f"{where}: quant_map must hold the 16 NF4 values, got {self.quant_map.numel()}")

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @property
    def nested_quant_map(self) -> torch.Tensor | None:
        """bitsandbytes' name for `nested_code`."""
        return self.nested_code

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.packed, self.absmax, self.offset, self.nested_absmax, self.nested_code, self.quant_map

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on `device` (the shape, dtype and block sizes are unchanged)."""
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.offset), move(self.nested_absmax), move(self.nested_code), self.nested_blocksize,
            move(self.quant_map),
        )  # fmt: skip

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block, rebuilt as bitsandbytes does (code8[q] * absmax2, then + offset)."""
        if not self.nested:
            return self.absmax
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return self.nested_code[self.absmax.long()] * scale + self.offset

    def dequantize(self, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, out_dtype)

    # --- bitsandbytes Linear4bit state dicts ----------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The entries `bnb.nn.Linear4bit.state_dict()` holds for this weight, under `prefix`."""
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

    def as_module_state(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """What the state dict of a module holding this weight carries: the Linear4bit entries, detached."""
        return {k: v.detach() for k, v in self.to_bnb_state_dict(prefix).items()}

    @classmethod
    def from_bnb_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
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
            packed=packed,
            absmax=state[f"{prefix}.absmax"],
            shape=tuple(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device) if nested else None,
            nested_absmax=state[f"{prefix}.nested_absmax"] if nested else None,
            nested_code=state[f"{prefix}.nested_quant_map"] if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
            quant_map=None if quant_map is None else quant_map.float(),
        )


def register_nf4_weight(module: torch.nn.Module, name: str, q: NF4Weight) -> None:
    """Hold `q` as `module.<name>` and save/load it in `bnb.nn.Linear4bit`'s state-dict format.

    `module.state_dict()` then carries `<name>`, `<name>.absmax`, ... exactly as bitsandbytes
    writes them, and `module.load_state_dict(sd)` rebuilds the NF4Weight from those entries (on
    the device of the one it replaces). An NF4Weight is not a buffer, so `module.to(device)` does
    not move it: quantize after the move, or assign `q.to(device)`.
    """
    if name in module._parameters:
        del module._parameters[name]
    module.__dict__[name] = q

    def save(mod: torch.nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        state.update(mod.__dict__[name].as_module_state(prefix + name))

    def load(mod: torch.nn.Module, state: dict, prefix: str, metadata: dict, strict: bool, missing: list, *args: Any) -> None:
        if prefix + name not in state:
            if strict:
                missing.append(prefix + name)  # not a parameter, so torch's own check cannot see it
            return
        keys = [k for k in list(state) if k == prefix + name or k.startswith(f"{prefix}{name}.")]
        loaded = NF4Weight.from_bnb_state_dict({k: state[k] for k in keys}, prefix + name)
        mod.__dict__[name] = loaded.to(mod.__dict__[name].device)
        for k in keys:
            del state[k]

    module._register_state_dict_hook(save)
    module._register_load_state_dict_pre_hook(load, with_module=True)


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


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4-quantize `w` byte-identically to bitsandbytes 0.50's CPU `quantize_4bit(..., "nf4")`."""
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4: weight dtype {w.dtype} is not supported; cast it to float32, float16 or bfloat16")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: the weight is empty (shape {list(w.shape)})")
    flat = w.detach().reshape(-1).float()
    packed, absmax = _quantize_4bit_codes(flat, blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize)
    offset = absmax.mean()
    nested_code = dynamic_map_signed().to(flat.device)
    q_absmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(packed, q_absmax, tuple(w.shape), w.dtype, blocksize, offset, nested_absmax, nested_code)


# --- shared Triton pieces -----------------------------------------------------------------------


@triton.jit
def _block_scale(absmax, nested_code, nested_absmax, offset, blk, mask, NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """fp32 absmax of the 4-bit blocks `blk`; nested: code8[q] * absmax2 rounded, then + offset rounded."""
    if NESTED:
        q = tl.load(absmax + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code + q, mask=mask, other=0.0) * tl.load(nested_absmax + blk // NESTED_BS, mask=mask, other=0.0)
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _round_to_bf16(v):
    """fp32 -> bf16 with round-to-nearest-even on the bits (the interpreter's cast truncates)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


_SOFT_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """Round-to-nearest-even cast of fp32 `v` (GPUs convert natively; the interpreter gets the bit version)."""
    if _SOFT_BF16 and dtype == tl.bfloat16:
        return _round_to_bf16(v)
    else:
        return v.to(dtype)


@triton.jit
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


# --- dequantization -----------------------------------------------------------------------------


@triton.jit
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


def _nested_args(q: NF4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nested-state pointers; the absmax stands in for them when the weight is not nested."""
    if q.nested:
        return q.nested_code, q.nested_absmax, q.offset
    return q.absmax, q.absmax, q.absmax


def dequantize_nf4_reference(q: NF4Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch dequantization, the same fp32 operations as bitsandbytes."""
    n = q.numel
    codes = torch.empty(q.packed.numel() * 2, dtype=torch.long, device=q.device)
    codes[::2] = (q.packed.reshape(-1) >> 4).long()
    codes[1::2] = (q.packed.reshape(-1) & 15).long()
    values = q.quant_map.float()[codes[:n]]
    absmax = q.block_absmax().float().repeat_interleave(q.blocksize)[:n]
    return (values * absmax).reshape(q.shape).to(out_dtype or q.dtype)


def _check_device(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"kernels.nf4.{what}: the Triton kernels run on CUDA tensors, got {device}; use "
            "F.linear(x, q.dequantize(x.dtype)) (the `kernels: torch` path) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def dequantize_nf4(q: NF4Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight, bit-identical to bitsandbytes' dequantize_4bit.

    Triton on CUDA (or under TRITON_INTERPRET=1); the torch reference elsewhere, so the
    `kernels: torch` path runs on a plain CPU.
    """
    out_dtype = out_dtype or q.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    if q.device.type != "cuda" and not INTERPRET:
        return dequantize_nf4_reference(q, out_dtype)
    out = _new_output(q.shape, out_dtype, q.device)
    n = out.numel()
    bytes_per_program = 1024
    _dequant_kernel[(triton.cdiv((n + 1) // 2, bytes_per_program),)](
        q.packed, q.absmax, q.quant_map, *_nested_args(q), out, n,
        BLOCKSIZE=q.blocksize, NESTED=q.nested, NESTED_BS=q.nested_blocksize, BYTES=bytes_per_program,
        enable_fp_fusion=False,  # bitsandbytes rounds code8 * absmax2 before adding the offset
    )  # fmt: skip
    return out


# --- fused dequant + matmul ---------------------------------------------------------------------


@triton.jit
def _lora_epilogue(acc, xa, lora_b, rows, cols, M, N, R, scaling, stride_am, stride_bn,
                   BR: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """acc + scaling * xa[rows] @ lora_b[cols]^T, the rank dimension in chunks of BR."""
    lora = tl.zeros(acc.shape, dtype=tl.float32)
    for r0 in range(0, R, BR):
        rs = r0 + tl.arange(0, BR)
        a = tl.load(xa + rows[:, None] * stride_am + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        b = tl.load(lora_b + cols[:, None] * stride_bn + rs[None, :], mask=(cols[:, None] < N) & (rs[None, :] < R), other=0.0)
        if USE_DOT:
            lora = dot_acc(lora, a.to(tl.float32), tl.trans(b.to(tl.float32)), IEEE)
        else:
            lora += tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    return acc + scaling * lora


@triton.jit
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
        acc = _lora_epilogue(acc, xa, lora_b, rows, cols, M, N, R, scaling, stride_am, stride_bn, BR, False, False)
    tl.store(out + rows[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
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


@triton.jit
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
        acc = _lora_epilogue(acc, xa, lora_b, rows, cols, M, N, R, scaling, stride_am, stride_bn, BR, True, IEEE)
    out_ptrs = out + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _nf4_gemm_t_kernel(dy, packed, absmax, quant_map, nested_code, nested_absmax, offset, out, M, N, K, stride_dm, stride_om,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, PAIRED: tl.constexpr,
                       IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """out[M, K] = dy[M, N] @ W[N, K]: each program owns a [BM, BK] tile and walks N, W tiles dequantized in the loop."""
    pid_m, pid_k = _grouped_tile(M, K, BM, BK, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    ks = k0 + tl.arange(0, BK)
    dy_rows = dy + rows.to(tl.int64)[:, None] * stride_dm
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        g = tl.load(dy_rows + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        w = _w_tile(packed, absmax, quant_map, nested_code, nested_absmax, offset, ns, k0, N, K,
                    BK, BLOCKSIZE, NESTED, NESTED_BS, PAIRED)  # fmt: skip
        acc = dot_acc(acc, g, _cast(w, dy.dtype.element_ty), IEEE)
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


def _check_matmul_inputs(x: torch.Tensor, q: NF4Weight, what: str) -> None:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"kernels.nf4.{what}: expected an NF4Weight, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"kernels.nf4.{what}: the NF4 weight must be 2-D [out, in], got shape {list(q.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"kernels.nf4.{what}: input dtype {x.dtype} is not float32, float16 or bfloat16")
    if x.device != q.device:
        raise ValueError(f"kernels.nf4.{what}: input on {x.device} but the NF4 weight on {q.device}; move it with q.to(device)")
    _check_device(x.device, what)


def nf4_matmul(
    x: torch.Tensor,
    q: NF4Weight,
    bias: torch.Tensor | None = None,
    *,
    lora_xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """`x @ W^T + bias + scaling * lora_xa @ lora_b^T` for x [..., in], W = dequant(q) [out, in].

    `lora_xa` is [..., r] (the rank projection of x; fp32 is fine), `lora_b` [out, r]. The output
    has x's dtype. M <= 16 rows take the GEMV-like kernel, more rows the tiled GEMM.
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
        "NESTED_BS": q.nested_blocksize, "PAIRED": k % 2 == 0, "BR": min(64, max(16, triton.next_power_of_2(r))),
        "enable_fp_fusion": False,  # the weight's absmax is rebuilt with bitsandbytes' separate roundings
    }  # fmt: skip
    if m <= SMALL_M:
        _nf4_gemv(args, common, m, n_out)
    else:
        _nf4_gemm(args, common, m, n_out, x.dtype)
    return out.reshape(*lead, n_out)


def _nf4_gemv(args: tuple, common: dict, m: int, n_out: int) -> None:
    bm = max(1, triton.next_power_of_2(m))
    bn, bk = _gemv_tiles(bm)
    _nf4_gemv_kernel[(triton.cdiv(n_out, bn),)](*args, **common, BM=bm, BN=bn, BK=bk)


def _nf4_gemm(args: tuple, common: dict, m: int, n_out: int, dtype: torch.dtype) -> None:
    bm, bn, bk = _gemm_tiles()
    grid = (triton.cdiv(m, bm) * triton.cdiv(n_out, bn),)
    _nf4_gemm_kernel[grid](*args, **common, IEEE=dtype == torch.float32, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M)


def nf4_matmul_t(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """`dy @ W` for dy [..., out]: the input gradient of `x @ W^T`, in dy's dtype."""
    _check_matmul_inputs(dy, q, "nf4_matmul_t")
    n_out, k = q.shape
    if dy.shape[-1] != n_out:
        raise ValueError(f"kernels.nf4.nf4_matmul_t: dy has {dy.shape[-1]} features but the NF4 weight is {list(q.shape)}")
    lead = dy.shape[:-1]
    g = dy.reshape(-1, n_out).contiguous()
    m = g.shape[0]
    out = _new_output((m, k), dy.dtype, dy.device)
    if m == 0:
        return out.reshape(*lead, k)
    bm, bn, bk = _gemm_tiles()
    if not INTERPRET and m <= SMALL_M:
        bm = 16
    _nf4_gemm_t_kernel[(triton.cdiv(m, bm) * triton.cdiv(k, bk),)](
        g, q.packed, q.absmax, q.quant_map, *_nested_args(q), out, m, n_out, k, g.stride(0), out.stride(0),
        BLOCKSIZE=q.blocksize, NESTED=q.nested, NESTED_BS=q.nested_blocksize, PAIRED=k % 2 == 0,
        IEEE=dy.dtype == torch.float32, BM=bm, BN=bn, BK=bk, GROUP_M=GROUP_M, enable_fp_fusion=False,
    )  # fmt: skip
    return out.reshape(*lead, k)


# --- torch.library ops and autograd -------------------------------------------------------------
# An NF4Weight is not a tensor, so the ops take its tensors and layout as separate arguments.


def _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype) -> NF4Weight:
    return NF4Weight(packed, absmax, tuple(shape), dtype, blocksize, offset, nested_absmax, nested_code, nested_blocksize, quant_map)


def _op_args(q: NF4Weight) -> tuple:
    return (q.packed, q.absmax, q.quant_map, q.offset, q.nested_absmax, q.nested_code,
            list(q.shape), q.blocksize, q.nested_blocksize, q.dtype)  # fmt: skip


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
    nested_blocksize: int, dtype: torch.dtype, bias: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return nf4_matmul(x, q, bias)


@_linear_op.register_fake
def _(x, packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("pefomed::nf4_matmul_t", mutates_args=())
def _matmul_t_op(
    dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, offset: torch.Tensor | None,
    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int], blocksize: int,
    nested_blocksize: int, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    q = _rebuild(packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype)
    return nf4_matmul_t(dy, q)


@_matmul_t_op.register_fake
def _(dy, packed, absmax, quant_map, offset, nested_absmax, nested_code, shape, blocksize, nested_blocksize, dtype):
    return dy.new_empty((*dy.shape[:-1], shape[1]))


def _linear_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _x, *weight, bias = inputs
    tensors, layout = weight[:6], weight[6:]
    ctx.save_for_backward(*tensors)
    ctx.layout = layout
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    need_dx, need_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[-1]
    dx = torch.ops.pefomed.nf4_matmul_t(dy, *ctx.saved_tensors, *ctx.layout) if need_dx else None
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_dbias else None
    return (dx, *([None] * 10), dbias)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(q)^T + bias` with backward to x (and bias); the NF4 weight gets no grad."""
    return torch.ops.pefomed.nf4_linear(x, *_op_args(q), bias)


def nf4_dequantize(q: NF4Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`dequantize_nf4` as a custom op: opaque to torch.compile, which traces it without a graph break."""
    return torch.ops.pefomed.nf4_dequantize(*_op_args(q), out_dtype or q.dtype)
