"""LlamaRMSNorm in Triton with a lean backward: `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`.

Layout (Liger-Kernel style): the `@triton.jit` kernels, the launchers `rms_norm_forward` /
`rms_norm_backward`, one `torch.autograd.Function` (`RMSNormFunction`), the `torch.library` ops
`pefomed::rms_norm` / `pefomed::rms_norm_backward` (the forward op carries the same autograd
formula through `register_autograd`, so `torch.compile(fullgraph=True)` and `opcheck` see one op
with its backward), and `rms_norm_reference`, HF's math in plain PyTorch.

Math (transformers' LlamaRMSNorm, exactly): the row is normalized in fp32, cast back to x's dtype,
then multiplied by the weight in `promote(weight.dtype, x.dtype)` (bf16 x and bf16 weight: a bf16
product, rounded once; an fp32 weight gives an fp32 output, as in PyTorch).

Memory: the forward saves x (the autograd graph holds it anyway) and the fp32 `rstd` per row (4
bytes a row), never the normalized activations; the backward recomputes `x * rstd`. dW is
reduced in fp32: each backward program accumulates its rows' `dy * normed` in registers and
writes one fp32 partial row, and the launcher sums the partials (one pass, no atomics, so the
result is deterministic).

Strides: x, dy may be any 2-D view of `[..., hidden]` (row and column strides are kernel
arguments); outputs are new contiguous tensors. Row offsets are 64-bit.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WHERE = "kernels.rms_norm"
MAX_HIDDEN = 65536  # one row per program in registers


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers write comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, n_cols, stride_xm, stride_xn, stride_w, stride_ym, eps,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y[row] = w * (x * rstd).to(x.dtype) in promote(w, x); rstd[row] = rsqrt(mean(x^2) + eps) (fp32)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps))  # once a row: exact rounding is free
    normed = (x * rstd).to(x_ptr.dtype.element_ty)  # HF casts back before the scale
    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)  # exact in fp32: one rounding, as the product in y's dtype
    tl.store(y_ptr + row * stride_ym + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    n_rows, n_cols, rows_per_program,
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_w, stride_dxm, stride_dwp,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx = rstd * (dn - n * mean(dn * n)) with n = x * rstd, dn = (dy * w).to(x.dtype) (the cast of
    HF's graph); dw partial[pid] = sum over this program's rows of dy * n.to(x.dtype), in fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_xm + cols * stride_xn, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dym + cols * stride_dyn, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        if NEED_DW:
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        if NEED_DX:
            # the product dy * w is formed in y's dtype, then cast to x's dtype, as autograd does
            dn = (dy * w).to(dy_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
            proj = tl.sum(dn * n, axis=0) / n_cols
            dx = (dn - n * proj) * rstd
            tl.store(dx_ptr + row * stride_dxm + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * stride_dwp + cols, dw, mask=mask)


# --- launchers --------------------------------------------------------------------------------


def _settings(n_cols: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps): the whole row in one program, at least 8 elements a thread (one
    128-bit load of bf16). The backward holds four fp32 rows (x, dy, w, dW) a thread, so it gets
    half the warps: at 16 warps ptxas caps it near 40 registers and spills on sm_80 (the gate)."""
    block = triton.next_power_of_2(n_cols)
    if _INTERPRET:
        return block, 1
    per_warp = 512 if backward else 256
    return block, min(16, max(4, block // per_warp))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dw_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: each reduces a contiguous run of rows into one dW partial."""
    if device.type != "cuda":
        return max(1, min(n_rows, 4))
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_rows, 2 * sms))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{_WHERE}: x is {x.dtype}, weight {weight.dtype}; the Triton path takes float16, bfloat16 or float32")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{_WHERE}: weight must be [hidden] = [{x.shape[-1] if x.dim() else '?'}], got {list(weight.shape)} for x {list(x.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"{_WHERE}: hidden size {x.shape[-1]} > {MAX_HIDDEN}; use `kernels: torch`")
    if x.device != weight.device:
        raise ValueError(f"{_WHERE}: x on {x.device}, weight on {weight.device}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"{_WHERE}: the Triton path runs on CUDA tensors, got {x.device}; use `kernels: torch` "
            "(models.llama.rms_norm) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims collapse; else a copy


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y, rstd)`: y of x's shape in promote(weight, x), rstd fp32 of x's shape without the last dim."""
    _check(x, weight)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = _new_output(tuple(x.shape), torch.promote_types(weight.dtype, x.dtype), x.device)
    rstd = _new_output(tuple(x.shape[:-1]), torch.float32, x.device)
    if n_rows == 0 or n_cols == 0:
        return y, rstd.fill_(float("nan"))  # torch: the mean of an empty row is nan
    block, warps = _settings(n_cols)
    _rms_norm_fwd_kernel[(n_rows,)](
        x2, weight, y, rstd, n_rows, n_cols, x2.stride(0), x2.stride(1), weight.stride(0), n_cols, float(eps),
        BLOCK_N=block, num_warps=warps,
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dx: bool = True, need_dw: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dx, dw)` (empty where not needed): dx in x's dtype, dw in weight's dtype (fp32 sum)."""
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = _new_output(tuple(x.shape), x.dtype, x.device) if need_dx else x.new_empty(0)
    if not need_dw and not need_dx:
        return dx, weight.new_empty(0)
    programs = _dw_programs(n_rows, x.device) if n_rows else 1
    partial = _new_output((programs, n_cols), torch.float32, x.device) if need_dw else x.new_empty(0, dtype=torch.float32)
    if n_rows and n_cols:
        block, warps = _settings(n_cols, backward=True)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd.reshape(-1), dx if need_dx else x2, partial if need_dw else rstd,
            n_rows, n_cols, triton.cdiv(n_rows, programs),
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), n_cols, n_cols,
            NEED_DX=need_dx, NEED_DW=need_dw, BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
    elif need_dw:
        partial.zero_()
    dw = partial.sum(0).to(weight.dtype) if need_dw else weight.new_empty(0)
    return dx, dw


# --- torch.library ops and autograd ------------------------------------------------------------


@torch.library.custom_op("pefomed::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pefomed::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, weight, rstd, need_dx, need_dw)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, weight.new_empty(weight.shape if need_dw else (0,))


class RMSNormFunction(torch.autograd.Function):
    """`(y, rstd)` with gradients for x and weight; saves x, weight and rstd only.

    `setup_context` / `backward` are also the autograd formula of `pefomed::rms_norm`.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.pefomed.rms_norm(x, weight, eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        if hasattr(ctx, "mark_non_differentiable"):
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _drstd: torch.Tensor | None) -> tuple:
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = torch.ops.pefomed.rms_norm_backward(dy, x, weight, rstd, need_dx, need_dw)
        return dx if need_dx else None, dw if need_dw else None, None


_rms_norm_op.register_autograd(RMSNormFunction.backward, setup_context=RMSNormFunction.setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of x `[..., hidden]` by weight `[hidden]` (the `LlamaOps.rms_norm` signature)."""
    # the op directly: its registered autograd is RMSNormFunction's, and torch.compile and
    # opcheck see one op with its backward
    return torch.ops.pefomed.rms_norm(x, weight, eps)[0]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward as a function (plain autograd; any dtype incl. float64)."""
    dtype = x.dtype
    h = x.to(torch.float32) if dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


# --- compile gate (bench/static.py) -------------------------------------------------------------


def STATIC_CASES():
    from pefomed.bench.static import Ptr, StaticCase

    cases = []
    rows = 8192
    for hidden in (4096, 8192):  # LLaMA-2/3 7-8B, 70B
        block, warps = _settings(hidden)
        _, bwd_warps = _settings(hidden, backward=True)
        for w_dtype in (torch.bfloat16, torch.float32):
            tag = f"h{hidden}.w{'bf16' if w_dtype == torch.bfloat16 else 'fp32'}"
            cases.append(StaticCase(
                name=f"rms_norm.fwd.{tag}",
                kernel=_rms_norm_fwd_kernel,
                args={"x_ptr": Ptr(torch.bfloat16), "w_ptr": Ptr(w_dtype), "y_ptr": Ptr(torch.promote_types(w_dtype, torch.bfloat16)),
                      "rstd_ptr": Ptr(torch.float32), "n_rows": rows, "n_cols": hidden, "stride_xm": hidden,
                      "stride_xn": 1, "stride_w": 1, "stride_ym": hidden, "eps": 1e-5},
                configs=[triton.Config({"BLOCK_N": block}, num_warps=warps)],
                streaming=True,
            ))  # fmt: skip
            cases.append(StaticCase(
                name=f"rms_norm.bwd.{tag}",
                kernel=_rms_norm_bwd_kernel,
                args={"dy_ptr": Ptr(torch.promote_types(w_dtype, torch.bfloat16)), "x_ptr": Ptr(torch.bfloat16),
                      "w_ptr": Ptr(w_dtype), "rstd_ptr": Ptr(torch.float32), "dx_ptr": Ptr(torch.bfloat16),
                      "dw_ptr": Ptr(torch.float32), "n_rows": rows, "n_cols": hidden, "rows_per_program": 32,
                      "stride_dym": hidden, "stride_dyn": 1, "stride_xm": hidden, "stride_xn": 1, "stride_w": 1,
                      "stride_dxm": hidden, "stride_dwp": hidden, "NEED_DX": True, "NEED_DW": True},
                configs=[triton.Config({"BLOCK_N": block}, num_warps=bwd_warps)],
                streaming=True,
            ))  # fmt: skip
    return cases


__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_backward", "rms_norm_forward", "rms_norm_reference"]
