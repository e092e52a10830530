"""Fused LoRA linear: `y = x W^T + b + scaling * dropout(x) A^T B^T` in Triton.

Layout (Liger-Kernel style): the `@triton.jit` kernels, the launchers `lora_forward` /
`lora_backward`, one `torch.autograd.Function`, and two `torch.library.custom_op`s so that
`torch.compile(fullgraph=True)` traces the layer without a graph break.

Forward
  1. `xa = dropout(x) A^T` ([M, r], fp32) by `_rank_project_kernel`; the dropout mask is drawn
     inside the loads of x and 1/(1-p) is applied once to the fp32 accumulator.
  2. `x W^T` by `_lora_matmul_kernel` (fp32 accumulator, grouped tile ordering); its epilogue
     adds `bias` and `scaling * xa_tile B_tile^T`, so there is no separate add or scale pass.
  `xa` is saved for the backward (M * r floats, computed once).

Backward
  `dB = scaling dY^T xa`, `g = scaling dY B` ([M, r]), `dA = g^T dropout(x)` (mask regenerated
  in the loads), `dX = dY W + (g A) * mask / (1-p)` with the LoRA term in the dX GEMM's epilogue.
  W gets no gradient and is never copied, upcast or saved in another dtype; no dropped copy of x
  is ever stored.

Dropout masks
  The mask is a pure function of (seed, element index): element (m, k) of the 2-D view of x
  ([M, in]) is kept iff `tl.rand(seed, m * in + k) >= p` (Philox, `kernels.common.keep_mask`).
  Forward, backward (the NF4 dX kernel included) and `dropout_mask` all evaluate the same
  function, so the backward uses the forward's mask and
  `lora_linear_reference(..., seed=s)` draws the kernel's mask. With `seed=None` the Triton path
  draws a fresh seed from torch's generator (so `torch.manual_seed` makes runs reproducible),
  while the plain PyTorch path (`kernels: torch`) uses `F.dropout`: the two paths then draw
  *different* masks, and parity tests pass the same explicit seed to both.

Dtypes
  x and W: fp32, fp16 or bf16, the same dtype (W is never cast). LoRA params and bias may be in
  another float dtype (e.g. fp32 adapters with bf16 activations): they are cast to x's dtype
  inside the kernels for the dots, and their gradients come back in their own dtype. fp32
  inputs use TF32 dots only when `torch.backends.cuda.matmul.allow_tf32` is set, as torch does.

QLoRA
  When `weight` is a `kernels.nf4.NF4Tensor`, the base GEMMs are the NF4 ops: `pefomed::nf4_linear`
  (`x W^T + b` with the LoRA term `scaling * xa B^T` in its epilogue) and `pefomed::nf4_matmul_t`
  (`dY W` with the LoRA part of dX, mask included, in its epilogue). The adapter-only pieces run as
  `pefomed::lora_project` (xa) and `pefomed::lora_adapter_backward` (dA, dB and g), the same
  launchers the dense ops use, so QLoRA also compiles with fullgraph=True.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

from pefomed.kernels.common import keep_mask
from pefomed.kernels.nf4 import NF4Tensor, nf4_matmul, nf4_matmul_t, nf4_op_args

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SEED_RANGE = 2**31 - 1


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher writes comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), rm, rk, K, p)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], keep.to(tl.int8), mask=inside)


@triton.jit
def _rank_project_kernel(
    in_ptr, w_ptr, out_ptr, seed_ptr,
    M, K, R,
    stride_im, stride_ik, stride_wr, stride_wk, stride_om, stride_or,
    scale, p,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[M, R] = scale * dropout(in)[M, K] @ w[R, K]^T, fp32 out (xa and g)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rm[:, None] < M
    in_ptrs = in_ptr + rm.to(tl.int64)[:, None] * stride_im + rk[None, :] * stride_ik
    w_ptrs = w_ptr + rr[None, :] * stride_wr + rk[:, None] * stride_wk
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(in_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        if DROPOUT:
            a = tl.where(keep_mask(seed, rm, rk + k0, K, p), a, tl.zeros_like(a))
        w = tl.load(w_ptrs, mask=(rr[None, :] < R) & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
        in_ptrs += BLOCK_K * stride_ik
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or
    tl.store(out_ptrs, acc * scale, mask=row_ok & (rr[None, :] < R))


@triton.jit
def _rank_reduce_kernel(
    left_ptr, right_ptr, out_ptr, seed_ptr,
    M, K, R, SPLIT,
    stride_lm, stride_lr, stride_rm, stride_rk, stride_os, stride_or, stride_ok,
    scale, p,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[s, R, K] = scale * sum over this split's rows m of left[m, R]^T dropout(right)[m, K].

    The reduction runs over M (all tokens), so it is split over SPLIT programs per column
    block for parallelism; the launcher sums the SPLIT fp32 partials (dA and dB^T).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    k_ok = rk < K
    r_ok = rr < R
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_s * BLOCK_M, M, SPLIT * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        left_t = tl.load(
            left_ptr + rm64[None, :] * stride_lm + rr[:, None] * stride_lr,
            mask=r_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            right_ptr + rm64[:, None] * stride_rm + rk[None, :] * stride_rk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            b = tl.where(keep_mask(seed, rm, rk, K, p), b, tl.zeros_like(b))
        acc = tl.dot(left_t.to(b.dtype), b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + pid_s * stride_os + rr[:, None] * stride_or + rk[None, :] * stride_ok
    tl.store(out_ptrs, acc * scale, mask=r_ok[:, None] & k_ok[None, :])


@triton.jit
def _lora_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, left_ptr, right_ptr, seed_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    lora_scale, p,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """c[M, N] = a[M, K] @ b[K, N] + bias + keep * lora_scale * (left[M, R] @ right[R, N]).

    Forward: a = x, b = W^T, left = xa, right = B^T, lora_scale = scaling.
    dX:      a = dY, b = W,  left = g,  right = A,   lora_scale = 1/(1-p), keep = mask.
    M_BUCKET only keys the autotuner.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks sweep the columns together, so b stays in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ty = c_ptr.dtype.element_ty
    if HAS_LORA:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        left = tl.load(
            left_ptr + rm.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        right = tl.load(
            right_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        lora = tl.dot(left.to(out_ty), right.to(out_ty), input_precision=PRECISION) * lora_scale
        if DROPOUT:
            lora = tl.where(keep_mask(tl.load(seed_ptr), rm, rn, N, p), lora, 0.0)
        acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(out_ty), mask=m_ok[:, None] & n_ok[None, :])


def _matmul_configs() -> list[triton.Config]:
    if _INTERPRET:  # the interpreter crashes on >1 config, and small tiles keep it fast
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    # H100 (sm_90): large tiles for the big token counts of training, 64-wide for small M.
    shapes = [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


_lora_matmul_tuned = triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K"])(_lora_matmul_kernel)

# The small rank-r kernels are memory-bound on x / dY: one good config each, no tuning.
_RANK_BLOCKS: dict[str, Any] = (
    {"BLOCK_M": 32, "BLOCK_K": 32} if _INTERPRET else {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
)


# --- launchers --------------------------------------------------------------------------------


def _rank_pad(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two; masks cover the padding."""
    return max(16, triton.next_power_of_2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dropout_active(dropout_p: float, seed: torch.Tensor | None) -> bool:
    if dropout_p > 0 and seed is None:
        raise ValueError("kernels.lora: dropout_p > 0 needs a seed tensor (int64, 1 element)")
    return dropout_p > 0


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(m: int, col_blocks: int, block_m: int, device: torch.device) -> int:
    """How many programs share the reduction over M: about two waves of the GPU in total."""
    if _INTERPRET or device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(m, block_m), triton.cdiv(2 * sms, col_blocks)))


def _rank_project(
    inp: torch.Tensor, w_rk: tuple[torch.Tensor, int, int], r: int, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> torch.Tensor:
    """fp32 [M, r] = scale * dropout(inp) @ W^T with W given as (tensor, stride_r, stride_k)."""
    w, stride_wr, stride_wk = w_rk
    m, k = inp.shape
    out = _new_output((m, r), torch.float32, inp.device)
    dropout = _dropout_active(dropout_p, seed)
    grid = (triton.cdiv(m, _RANK_BLOCKS["BLOCK_M"]),)
    _rank_project_kernel[grid](
        inp, w, out, seed,
        m, k, r,
        inp.stride(0), inp.stride(1), stride_wr, stride_wk, out.stride(0), out.stride(1),
        scale, dropout_p,
        DROPOUT=dropout, R_PAD=_rank_pad(r), PRECISION=_dot_precision(inp.dtype), **_RANK_BLOCKS,
    )  # fmt: skip
    return out


def _rank_reduce(
    left: torch.Tensor, right: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> torch.Tensor:
    """fp32 [r, K] = scale * left[M, r]^T @ dropout(right)[M, K]."""
    m, r = left.shape
    k = right.shape[1]
    block_m, block_k = _RANK_BLOCKS["BLOCK_M"], _RANK_BLOCKS["BLOCK_K"]
    col_blocks = triton.cdiv(k, block_k)
    splits = _num_splits(m, col_blocks, block_m, right.device)
    partial = _new_output((splits, r, k), torch.float32, right.device)
    dropout = _dropout_active(dropout_p, seed)
    _rank_reduce_kernel[(col_blocks, splits)](
        left, right, partial, seed,
        m, k, r, splits,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        scale, dropout_p,
        DROPOUT=dropout, R_PAD=_rank_pad(r), PRECISION=_dot_precision(right.dtype), **_RANK_BLOCKS,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


def _matmul_lora(
    a: tuple[torch.Tensor, int, int],
    b: tuple[torch.Tensor, int, int],
    out: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None,
    left: torch.Tensor | None,
    right: tuple[torch.Tensor, int, int] | None,
    lora_scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """out[M, N] = a @ b + bias + keep * lora_scale * left @ right; operands as (tensor, stride0, stride1)."""
    a_t, stride_am, stride_ak = a
    b_t, stride_bk, stride_bn = b
    m, n = out.shape
    has_lora = left is not None and right is not None
    r = left.shape[1] if has_lora else 1
    right_t, stride_rr, stride_rn = right if has_lora else (out, 0, 0)
    dropout = has_lora and _dropout_active(dropout_p, seed)
    args = (
        a_t, b_t, out, bias, left, right_t, seed,
        m, n, k, r, triton.next_power_of_2(m),
        stride_am, stride_ak, stride_bk, stride_bn, out.stride(0), out.stride(1),
        left.stride(0) if has_lora else 0, left.stride(1) if has_lora else 0, stride_rr, stride_rn,
        lora_scale, dropout_p,
    )  # fmt: skip
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_LORA": has_lora,
        "DROPOUT": dropout,
        "R_PAD": _rank_pad(r),
        "PRECISION": _dot_precision(out.dtype),
    }

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _lora_matmul_tuned[grid](*args, **flags)
    return out


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"kernels.lora: the Triton path runs on CUDA tensors, got {device}; use `kernels: torch` "
            "(kernels.lora.lora_linear_reference) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _check_inputs(
    x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None, dropout_p: float
) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"kernels.lora: x has dtype {x.dtype}; the Triton path takes float16, bfloat16 or "
            "float32 (use kernels.lora.lora_linear_reference / `kernels: torch` for others)"
        )
    in_features = x.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"kernels.lora: weight must be 2-D [out, in], got shape {list(weight.shape)}")
    out_features, w_in = weight.shape
    if isinstance(weight, NF4Tensor):
        if not weight.is_contiguous():
            raise ValueError(f"kernels.lora: the NF4 base weight must be the [out, in] weight, not a transposed view: {weight!r}")
    elif weight.dtype != x.dtype:
        raise TypeError(
            f"kernels.lora: weight dtype {weight.dtype} differs from x dtype {x.dtype}; the frozen "
            "weight is never cast here, so load the model in the activation dtype"
        )
    if w_in != in_features:
        raise ValueError(f"kernels.lora: x has {in_features} features but weight is {list(weight.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape != (r, in_features) or lora_B.shape != (out_features, r):
        raise ValueError(
            f"kernels.lora: lora_A {list(lora_A.shape)} / lora_B {list(lora_B.shape)} do not fit "
            f"in={in_features}, out={out_features}; expected A [r, {in_features}], B [{out_features}, r]"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"kernels.lora: bias has shape {list(bias.shape)}, expected [{out_features}]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels.lora: dropout_p must be in [0, 1), got {dropout_p}")
    devices = {t.device for t in (x, lora_A, lora_B, bias, weight) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"kernels.lora: x, weight, lora_A, lora_B and bias are on different devices {sorted(map(str, devices))}")
    _check_device(x.device)


def lora_project(
    x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float = 0.0, seed: torch.Tensor | None = None
) -> torch.Tensor:
    """`xa = dropout(x) A^T` for 2-D x [M, in]: [M, r] in fp32, the mask drawn from `seed`."""
    keep_scale = 1.0 / (1.0 - dropout_p)
    return _rank_project(x, (lora_A, lora_A.stride(0), lora_A.stride(1)), lora_A.shape[0], keep_scale, dropout_p, seed)


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y, xa)` for 2-D x [M, in]: y [M, out] in x's dtype, xa = dropout(x) A^T [M, r] in fp32.

    `weight` is dense or an NF4Tensor. `seed` (int64, 1 element, on x's device) is needed when
    dropout_p > 0. `out` receives y.
    """
    m, k = x.shape
    n = lora_B.shape[0]
    xa = lora_project(x, lora_A, dropout_p, seed)
    if isinstance(weight, NF4Tensor):
        y = nf4_matmul(x, weight, bias, lora_xa=xa, lora_b=lora_B, scaling=scaling)
        if out is not None:
            return out.copy_(y), xa
        return y, xa
    if out is None:
        out = _new_output((m, n), x.dtype, x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"kernels.lora: out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} {list(out.shape)}")
    _matmul_lora(
        (x, x.stride(0), x.stride(1)),
        (weight, weight.stride(1), weight.stride(0)),  # W^T without a copy
        out,
        k,
        bias=bias,
        left=xa,
        right=(lora_B, lora_B.stride(1), lora_B.stride(0)),  # B^T
        lora_scale=scaling,
        dropout_p=0.0,
        seed=None,
    )
    return out, xa


def lora_adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dA, dB, g)` for 2-D dy [M, out]: dA/dB in the params' dtypes and g = scaling * dY B [M, r]
    in fp32, which the base weight's dX GEMM turns into the LoRA part of dX."""
    r = lora_B.shape[1]
    # dB^T [r, out] = scaling * xa^T dY; copy=True, or an fp32 B would get the transposed view
    d_b = _rank_reduce(xa, dy, scaling, 0.0, None).t().to(lora_B.dtype, memory_format=torch.contiguous_format, copy=True)
    # g [M, r] = scaling * dY B   (B^T seen as [r, out] through strides)
    g = _rank_project(dy, (lora_B, lora_B.stride(1), lora_B.stride(0)), r, scaling, 0.0, None)
    d_a = _rank_reduce(g, x, 1.0 / (1.0 - dropout_p), dropout_p, seed).to(lora_A.dtype)
    return d_a, d_b, g


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    need_dx: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`(dx, dA, dB)` for 2-D dy [M, out]; dx (None unless need_dx) in x's dtype, dA/dB in the params' dtypes."""
    m, k = x.shape
    n = lora_B.shape[0]
    d_a, d_b, g = lora_adapter_backward(dy, x, lora_A, lora_B, xa, scaling, dropout_p, seed)
    if not need_dx:
        return None, d_a, d_b
    if isinstance(weight, NF4Tensor):
        return nf4_matmul_t(dy, weight, lora_g=g, lora_a=lora_A, seed=seed, dropout_p=dropout_p), d_a, d_b
    dx = _new_output((m, k), x.dtype, x.device)
    _matmul_lora(
        (dy, dy.stride(0), dy.stride(1)),
        (weight, weight.stride(0), weight.stride(1)),
        dx,
        n,
        bias=None,
        left=g,
        right=(lora_A, lora_A.stride(0), lora_A.stride(1)),
        lora_scale=1.0 / (1.0 - dropout_p),
        dropout_p=dropout_p,
        seed=seed,
    )
    return dx, d_a, d_b


def dropout_mask(seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float, device: Any = None) -> torch.Tensor:
    """The kernels' keep-mask (bool, True = kept) for an x of `shape` and dropout `p`.

    Element index = position in the row-major 2-D view [prod(shape[:-1]), shape[-1]]. Runs the
    same Philox draw as the kernels, so it needs Triton (a GPU, or TRITON_INTERPRET=1 on CPU).
    """
    seed_t = _seed_tensor(seed, torch.device(device) if device is not None else None)
    _check_device(seed_t.device)
    shape = tuple(shape)
    k = shape[-1] if shape else 1
    m = max(1, int(torch.Size(shape[:-1]).numel())) if shape else 1
    mask = _new_output((m, k), torch.int8, seed_t.device)
    block_m, block_k = 64, 128
    _dropout_mask_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        seed_t, mask, m, k, p, BLOCK_M=block_m, BLOCK_K=block_k
    )
    return mask.view(torch.bool).reshape(shape)


def _seed_tensor(seed: int | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point:
            raise ValueError(f"kernels.lora: seed tensor must hold one integer, got {seed.dtype} {list(seed.shape)}")
        return seed.reshape(1).to(device=device if device is not None else seed.device, dtype=torch.int64)
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"kernels.lora: seed must be a non-negative int below 2**63, got {seed}")
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


# --- torch.library ops (opaque to torch.compile, traced through their fake impls) -------------


@torch.library.custom_op("pefomed::lora_linear_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


@_forward_op.register_fake
def _(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p):
    return x.new_empty((x.shape[0], lora_B.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pefomed::lora_linear_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, d_a, d_b = lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx)
    # A custom op cannot return None: an empty tensor stands for "no dx".
    return (dx if dx is not None else x.new_empty(0)), d_a, d_b


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# The adapter-only halves: with an NF4 base weight, the pefomed::nf4_* ops do the base GEMMs.


@torch.library.custom_op("pefomed::lora_project", mutates_args=())
def _project_op(x: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    return lora_project(x, lora_A, dropout_p, seed)


@_project_op.register_fake
def _(x, lora_A, seed, dropout_p):
    return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("pefomed::lora_adapter_backward", mutates_args=())
def _adapter_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_adapter_backward(dy, x, lora_A, lora_B, xa, scaling, dropout_p, seed)


@_adapter_backward_op.register_fake
def _(dy, x, lora_A, lora_B, xa, seed, scaling, dropout_p):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), xa.new_empty(xa.shape)


# --- autograd ---------------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """Gradients for x (if it requires grad), lora_A, lora_B and bias; none for the weight."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        bias: torch.Tensor | None,
        seed: torch.Tensor | None,
        scaling: float,
        dropout_p: float,
    ) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if isinstance(weight, NF4Tensor):
            xa = torch.ops.pefomed.lora_project(x2d, lora_A, seed, dropout_p)
            y = torch.ops.pefomed.nf4_linear(x2d, *nf4_op_args(weight), bias, xa, lora_B, scaling)
        else:
            y, xa = torch.ops.pefomed.lora_linear_forward(x2d, weight, lora_A, lora_B, bias, seed, scaling, dropout_p)
        # The weight is saved by reference (no copy, no cast, NF4 stays NF4); xa is M x r floats.
        ctx.save_for_backward(x2d, weight, lora_A, lora_B, xa, seed)
        ctx.scaling, ctx.dropout_p, ctx.x_shape = scaling, dropout_p, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_dx, _, _, _, need_dbias = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        if isinstance(weight, NF4Tensor):
            d_a, d_b, g = torch.ops.pefomed.lora_adapter_backward(dy2d, x2d, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p)
            if need_dx:
                dx = torch.ops.pefomed.nf4_matmul_t(dy2d, *nf4_op_args(weight), g, lora_A, seed, ctx.dropout_p)
        else:
            dx, d_a, d_b = torch.ops.pefomed.lora_linear_backward(
                dy2d, x2d, weight, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p, need_dx
            )
        dx = dx.reshape(ctx.x_shape) if need_dx else None
        d_bias = dy2d.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_dbias else None
        return dx, None, d_a, d_b, d_bias, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`x W^T + b + scaling * dropout(x) A^T B^T` for x [..., in], fused in Triton.

    Dropout is active when `training` and `dropout_p > 0`; its mask comes from `seed` (int or a
    1-element integer tensor), or from a seed drawn with torch's generator when `seed` is None.
    The base `weight` must be frozen; it is dense (x's dtype) or an `NF4Tensor` (QLoRA).
    """
    _check_inputs(x, weight, lora_A, lora_B, bias, dropout_p)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "kernels.lora.lora_linear: the base weight requires grad, but this kernel trains only "
            "lora_A / lora_B (and bias); freeze it with weight.requires_grad_(False)"
        )
    active = training and dropout_p > 0
    if not active:
        seed_t, dropout_p = None, 0.0
    elif seed is None:
        seed_t = torch.randint(0, _SEED_RANGE, (1,), device=x.device, dtype=torch.int64)
    else:
        seed_t = _seed_tensor(seed, x.device)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, seed_t, float(scaling), float(dropout_p))


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch `lora_linear` (F.linear ops, any dtype incl. float64).

    With a `seed` and active dropout it applies the kernels' mask (`dropout_mask`, which needs
    Triton); with `seed=None` it uses `F.dropout`, a different mask from the Triton path's.
    """
    from pefomed.kernels.reference import lora_linear_reference as torch_lora_linear

    mask = None
    if seed is not None and training and dropout_p > 0:
        mask = dropout_mask(seed, x.shape, dropout_p, device=x.device)
    return torch_lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, dropout_mask=mask)
