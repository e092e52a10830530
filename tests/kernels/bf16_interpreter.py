"""bf16 in the Triton interpreter with the GPU's semantics.

Usage (tests/kernels/*): nothing to do. `tests/kernels/conftest.py` makes the `bf16_interpreter`
fixture autouse, so every test under tests/kernels runs its Triton kernels in an interpreter whose
bf16 behaves as on an NVIDIA GPU. Tests elsewhere opt in with

    from tests.kernels.bf16_interpreter import bf16_interpreter  # noqa: F401  (or relative: from ..kernels.bf16_interpreter)
    pytestmark = pytest.mark.usefixtures("bf16_interpreter")

or, outside pytest, `with bf16_semantics(): kernel[grid](...)`.

Why: triton 3.9's interpreter stores bf16 as the raw uint16 bits and then computes on those bits.
`tl.dot` of two bf16 tiles multiplies the integers (garbage), fp32->bf16 casts and stores
truncate (the GPU's `cvt.rn.bf16.f32` rounds to nearest even), bf16 -> fp64 / int casts convert
the integer bit pattern, and bf16 elementwise arithmetic, comparisons and reductions work on the
bit patterns. Kernels that upcast both dot operands to fp32 to dodge this pass in the interpreter
but run TF32 MMA at half the bf16 rate on the GPU. With this patch a kernel keeps its bf16 operands
and is still checked against a float64 reference on the CPU.

What the patched interpreter does (the GPU's semantics; tests/kernels/test_bf16_interpreter.py
checks each against torch's bf16 on the CPU):
- `tl.dot` with bf16 operands: the real bf16 values, products exact in fp32 and fp32
  accumulation (numpy float32 matmul), as `mma.sync ... .bf16.bf16.f32` / `wgmma ... .bf16`.
  The summation order differs from the tensor cores', so results agree to fp32 accumulation error,
  not bit for bit.
- casts to bf16 round to nearest even (`cvt.rn.bf16.f32`), subnormals kept, inf kept, NaN stays a
  (quiet) NaN; fp64 -> bf16 and int -> bf16 round once (not via a rounded fp32); `rtz` truncates.
  bf16 -> fp32/fp64 is exact; bf16 -> int truncates toward zero.
- bf16 elementwise arithmetic (+ - * / fma min max neg, math functions) is computed in fp32 and
  rounded to nearest even once, as LLVM lowers it on sm_80 (`mul.rn.bf16` etc. on sm_90 give the
  same result: fp32 has more than 2*8+2 bits, so the double rounding is innocuous for + - * / sqrt).
  Comparisons compare values, not bit patterns.
- `tl.sum` / `tl.cumsum` in bf16 round after every addition (a pairwise tree for sums, as the
  GPU's shuffle tree; left to right for scans): a kernel that accumulates in bf16 loses the
  precision here that it loses on the GPU. `tl.max` / `tl.min` compare values.
Not emulated: TF32 rounding of fp32 `tl.dot` operands (the interpreter keeps exact fp32 products;
use `input_precision="ieee"` where fp32 precision matters), bf16 atomics, `tl.dot_scaled`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest

__all__ = [
    "bf16_bits_to_f32",
    "bf16_interpreter",
    "bf16_semantics",
    "f32_to_bf16_bits",
    "f64_to_bf16_bits",
    "installed",
]


# --- bit-exact conversions (numpy; bf16 held as uint16 bit patterns, as the interpreter does) ---


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns -> the exact float32 values (bf16 is the top half of a float32)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray, rounding: str = "rne") -> np.ndarray:
    """float32 -> bf16 bit patterns, rounded to nearest even ("rne") or toward zero ("rtz")."""
    x = np.asarray(x, dtype=np.float32)
    bits = np.ascontiguousarray(x).view(np.uint32).reshape(x.shape)  # ascontiguousarray makes 0-d 1-d
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if rounding == "rne":
        # Adding 0x7FFF plus the kept lsb carries into the kept half exactly when the dropped half
        # is above one half ulp, or equal to it with an odd kept lsb; a carry out of the mantissa
        # bumps the exponent, which is also right (largest finite rounds up to inf).
        lsb = (bits >> np.uint32(16)) & np.uint32(1)
        rounded = (bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)
    elif rounding == "rtz":
        rounded = bits >> np.uint32(16)
    else:
        raise ValueError(f"rounding={rounding!r}: expected 'rne' or 'rtz'")
    # A NaN whose payload sits only in the dropped bits would otherwise become inf (rtz) or carry
    # into the sign (rne): keep the sign and set the quiet bit.
    quiet = ((bits >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def f64_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> bf16 rounded once to nearest even.

    Rounding to float32 first and then to bf16 rounds twice (wrong at some ties). Rounding to
    float32 *to odd* first (truncate, then set the lsb when inexact) keeps the information that
    decides the second rounding, since float32 has more than bf16's 8 + 2 significand bits.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        back = f.astype(np.float64)
        # astype rounds to nearest; step back toward zero where it rounded away from zero.
        away = np.abs(back) > np.abs(x)
        f = np.where(away, np.nextafter(f, np.float32(0)), f)
        inexact = (f.astype(np.float64) != x) & np.isfinite(x)
    bits = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32).reshape(x.shape) | inexact.astype(np.uint32)
    return f32_to_bf16_bits(bits.view(np.float32))


# --- the patch ---


def _interp():
    from triton.runtime import interpreter

    return interpreter


_FLOAT_BINARY = (
    "create_fadd",
    "create_fsub",
    "create_fmul",
    "create_fdiv",
    "create_frem",
    "create_precise_divf",
    "create_approx_divf",
    "create_minimumf",
    "create_minnumf",
    "create_maximumf",
    "create_maxnumf",
)
_FLOAT_COMPARE = tuple(
    f"create_fcmp{c}" for c in ("OLT", "OGT", "OLE", "OGE", "OEQ", "ONE", "ULT", "UGT", "ULE", "UGE", "UEQ", "UNE")
)
_FLOAT_UNARY = (
    "create_fneg",
    "create_cos",
    "create_sin",
    "create_exp",
    "create_exp2",
    "create_log",
    "create_log2",
    "create_sqrt",
    "create_precise_sqrt",
    "create_rsqrt",
    "create_erf",
    "create_floor",
    "create_ceil",
)

_saved: list[tuple[object, str, object]] = []
_depth = 0


def installed() -> bool:
    """True while the bf16 semantics are patched into the interpreter."""
    return _depth > 0


def _patch_builder(interp) -> dict[str, object]:
    TH, tl = interp.TensorHandle, interp.tl
    B = interp.InterpreterBuilder
    orig = {name: getattr(B, name) for name in (*_FLOAT_BINARY, *_FLOAT_COMPARE, *_FLOAT_UNARY)}
    orig |= {n: getattr(B, n) for n in ("cast_impl", "create_fp_to_fp", "create_dot", "create_fma", "create_clampf")}

    def is_bf16(h) -> bool:
        return not isinstance(h.dtype, tl.pointer_type) and h.dtype.scalar == tl.bfloat16

    def up(h):
        return TH(bf16_bits_to_f32(h.data), tl.float32) if is_bf16(h) else h

    def down(h):
        # An fp32 result of a bf16 op goes back to bf16. A comparison's booleans are typed int1:
        # the interpreter's own binary_op labels them with the operand type, which would make a
        # later int1 -> int8 cast (storing a mask) decode them as bf16 bit patterns.
        if h.data.dtype == np.float32:
            return TH(f32_to_bf16_bits(h.data), tl.bfloat16)
        if h.data.dtype == np.bool_:
            return TH(h.data, tl.int1)
        return TH(h.data, tl.bfloat16)

    def wrap(name):
        fn = orig[name]

        def patched(self, *args):
            if any(isinstance(a, TH) and is_bf16(a) for a in args):
                return down(fn(self, *(up(a) if isinstance(a, TH) else a for a in args)))
            return fn(self, *args)

        patched.__name__ = name
        return patched

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src.data.dtype == np.bool_:
            src_ty = tl.int1  # a comparison result, whatever type label it carries
            if dst_ty != tl.bfloat16:
                return TH(src.data.astype(interp._get_np_dtype(dst_ty)), dst_ty)
        if src_ty == tl.bfloat16 and dst_ty != tl.bfloat16:
            value = bf16_bits_to_f32(src.data)
            if dst_ty.is_floating():
                if dst_ty.primitive_bitwidth == 8:
                    return orig["cast_impl"](self, TH(value, tl.float32), dst_type)
                return TH(value.astype(interp._get_np_dtype(dst_ty)), dst_ty)
            # fptosi / fptoui truncate toward zero (out-of-range is undefined on the GPU too).
            with np.errstate(invalid="ignore"):
                return TH(np.trunc(value).astype(interp._get_np_dtype(dst_ty)), dst_ty)
        if dst_ty == tl.bfloat16 and src_ty != tl.bfloat16:
            if src_ty.is_int() or src_ty == tl.float64:
                return TH(f64_to_bf16_bits(src.data.astype(np.float64)), dst_ty)
            if src_ty.is_floating() and src_ty.primitive_bitwidth in (16, 32):
                return TH(f32_to_bf16_bits(src.data.astype(np.float32)), dst_ty)
        return orig["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == tl.bfloat16 and src_ty in (tl.float32, tl.float16) and \
                rounding_mode == interp._ir.ROUNDING_MODE.RTZ:
            return TH(f32_to_bf16_bits(src.data.astype(np.float32), "rtz"), dst_ty)
        if (src_ty == tl.bfloat16 or dst_ty == tl.bfloat16) and not (src_ty.is_fp8() or dst_ty.is_fp8()):
            return cast_impl(self, src, dst_type)
        return orig["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (is_bf16(a) or is_bf16(b)):
            return orig["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        # bf16 x bf16 products are exact in fp32 (8 + 8 significand bits); the MMA accumulates in fp32.
        a32 = bf16_bits_to_f32(a.data) if is_bf16(a) else a.data.astype(np.float32)
        b32 = bf16_bits_to_f32(b.data) if is_bf16(b) else b.data.astype(np.float32)
        if is_bf16(d):
            acc = np.matmul(a32, b32, dtype=np.float32) + bf16_bits_to_f32(d.data)
            return TH(f32_to_bf16_bits(acc), tl.bfloat16)
        acc = np.matmul(a32, b32, dtype=np.float32) + d.data.astype(np.float32)
        return TH(acc.astype(d.data.dtype), d.dtype.scalar)

    patches = {name: wrap(name) for name in (*_FLOAT_BINARY, *_FLOAT_COMPARE, *_FLOAT_UNARY)}
    patches["create_fma"] = wrap("create_fma")
    patches["create_clampf"] = wrap("create_clampf")
    patches["cast_impl"] = cast_impl
    patches["create_fp_to_fp"] = create_fp_to_fp
    patches["create_dot"] = create_dot
    # create_fp_trunc / create_fp_ext / create_si_to_fp ... call `self.cast_impl`, looked up at
    # call time, so they pick up the patched cast_impl.
    return patches


def _bf16_tree_sum(values: np.ndarray, axis: int, keepdims: bool) -> np.ndarray:
    """Sum of bf16 values (float32 array) along `axis`, rounding to bf16 after every addition."""
    v = np.moveaxis(values, axis, -1)
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), np.float32)], axis=-1)
        v = bf16_bits_to_f32(f32_to_bf16_bits(v[..., 0::2] + v[..., 1::2]))
    if v.shape[-1] == 0:
        v = np.zeros(v.shape[:-1] + (1,), np.float32)
    out = v[..., 0]
    return np.expand_dims(out, axis) if keepdims else out


def _patch_reductions(interp) -> dict[tuple[type, str], object]:
    tl = interp.tl
    orig_sum, orig_min_max, orig_cumsum = interp.ReduceOps.sum, interp.ReduceOps.min_max, interp.ScanOps.cumsum

    def is_bf16(t) -> bool:
        return t.dtype == tl.bfloat16

    def to_bf16_tensor(self, f32):
        return self.to_tensor(f32_to_bf16_bits(np.asarray(f32, np.float32)), tl.bfloat16)

    def sum_(self, input):
        if not is_bf16(input):
            return orig_sum(self, input)
        values = bf16_bits_to_f32(input.handle.data)
        if self.axis is None:
            out = _bf16_tree_sum(values.reshape(-1), 0, False)
            if self.keep_dims:
                out = out.reshape((1,) * values.ndim)
            return to_bf16_tensor(self, out)
        return to_bf16_tensor(self, _bf16_tree_sum(values, self.axis, self.keep_dims))

    def min_max(self, input, val_reduce_op, idx_reduce_op=None):
        t = input[0] if isinstance(input, tuple) else input
        if not is_bf16(t):
            return orig_min_max(self, input, val_reduce_op, idx_reduce_op)
        f32_type = t.type.with_element_ty(tl.float32) if t.type.is_block() else tl.float32
        decoded = tl.core.tensor(interp.TensorHandle(bf16_bits_to_f32(t.handle.data), tl.float32), f32_type)
        out = orig_min_max(self, decoded, val_reduce_op, idx_reduce_op)
        outs = out if isinstance(out, tuple) else (out,)
        fixed = tuple(
            to_bf16_tensor(self, o.handle.data if o.type.is_block() else o.handle.data.reshape(()))
            if o.dtype == tl.float32 else o
            for o in outs
        )
        return fixed if isinstance(out, tuple) else fixed[0]

    def cumsum(self, input):
        if not is_bf16(input):
            return orig_cumsum(self, input)
        v = np.moveaxis(bf16_bits_to_f32(input.handle.data), self.axis, -1).copy()
        for i in range(1, v.shape[-1]):
            v[..., i] = bf16_bits_to_f32(f32_to_bf16_bits(v[..., i - 1] + v[..., i]))
        return [to_bf16_tensor(self, np.moveaxis(v, -1, self.axis))]

    return {
        (interp.ReduceOps, "sum"): sum_,
        (interp.ReduceOps, "min_max"): min_max,
        (interp.ScanOps, "cumsum"): cumsum,
    }


def _install() -> None:
    global _depth
    if _depth == 0:
        interp = _interp()
        B = interp.InterpreterBuilder
        for name, fn in _patch_builder(interp).items():
            _saved.append((B, name, B.__dict__.get(name)))
            setattr(B, name, fn)
        for (cls, name), fn in _patch_reductions(interp).items():
            _saved.append((cls, name, cls.__dict__.get(name)))
            setattr(cls, name, fn)
    _depth += 1


def _uninstall() -> None:
    global _depth
    _depth -= 1
    if _depth == 0:
        while _saved:
            cls, name, fn = _saved.pop()
            setattr(cls, name, fn)


@contextlib.contextmanager
def bf16_semantics() -> Iterator[None]:
    """Patch the Triton interpreter's bf16 semantics to the GPU's for the duration (nests)."""
    _install()
    try:
        yield
    finally:
        _uninstall()


@pytest.fixture
def bf16_interpreter() -> Iterator[bool]:
    """The Triton interpreter with the GPU's bf16 semantics; yields whether it is in use.

    A no-op (yields False) when kernels are compiled for a real GPU (TRITON_INTERPRET unset):
    there the hardware already has these semantics.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield False
        return
    with bf16_semantics():
        yield True
