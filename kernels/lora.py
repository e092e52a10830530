"""Fused LoRA linear: `y = x W^T + b + scaling * dropout(x) A^T B^T` in Triton.

Layout (Liger-Kernel style): the `@triton.jit` kernels, the launchers (`lora_forward`,
`lora_backward` and the adapter-only halves QLoRA uses), `torch.library` custom ops so that
`torch.compile(fullgraph=True)` (inductor included) traces the layer whole, and one
`torch.autograd.Function`.

Notation: x [M, K] (the 2-D view of the input), W [N, K] frozen, A [r, K], B [N, r], keep the
dropout mask over x, c = 1 / (1 - p), s = scaling.

Forward
  1. `_project_kernel` reads x once: it draws the dropout mask (`kernels.common.mask_bytes`, two
     Philox calls per 8 elements), stores it bit-packed (M*K/8 bytes, 4 MB at 8192 x 4096) and
     computes `xa = s c (keep * x) A^T` [M, r] (fp32, the left operand pre-scaled).
  2. The base GEMM `x W^T` with the LoRA term `xa B^T` and the bias in the same fp32 accumulator:
     - base_gemm="triton": `_matmul_kernel` starts its accumulator as `tl.dot(xa, B^T)` and runs
       the K loop on top of it: no second fp32 tile, so no spills;
     - base_gemm="cublas": `_expand_kernel` writes `xa B^T + b` into y, then cuBLAS adds
       `x W^T` on top with beta = 1 (`y.addmm_`), reading y in its epilogue.
Backward (dY [M, N])
  3. `_grads_kernel` reads dY once for all of `g = s dY B` [M, r], `dB = dY^T xa` [N, r] and the
     bias gradient (the sum over rows of dY).
  4. `_grad_a_kernel` reads x and the packed mask once: `dA = c g^T (keep * x)` [r, K].
  5. dX = `dY W + keep * (c g A)`, the LoRA term pre-scaled and masked from the packed bits, as
     the initial accumulator of the Triton GEMM or written by `_expand_kernel` before cuBLAS adds
     `dY W` (same switch as the forward).
  W gets no gradient and is never copied, upcast or saved in another dtype. The rank-r
  reductions over M (dB, dA) and over N (g) are split over enough programs for two waves of the
  GPU; the splits are summed with fp32 atomics, or, under `torch.use_deterministic_algorithms`,
  written to separate slices and summed in a fixed order.

Dtypes
  x and W: fp16, bf16 or fp32, the same dtype (W is never cast). The adapters (often fp32 master
  weights with bf16 activations) are cast to x's dtype once per step by the autograd function,
  and the backward reuses those casts; every dot takes operands of x's dtype (bf16 MMA for bf16)
  and accumulates in fp32; the gradients of A, B and the bias come back in their own dtypes.
  fp32 inputs use TF32 only when `torch.backends.cuda.matmul.allow_tf32` is set, as torch does.

Base GEMM switch (`base_gemm=` / `PEFOMED_LORA_BASE_GEMM` = triton | cublas | auto)
  What each route adds to the frozen GEMM, from the compiled code: the Triton route's rank-r term
  is r/K more MMA work (1.6 % at r = 64, K = 4096) and one [BLOCK_M, r] + [r, BLOCK_N] load per
  tile, with no extra memory pass; the cuBLAS route writes y once more before the GEMM (M*N*2
  bytes: 64 MB, about 20 us of an H100's 3.35 TB/s, 5 % of a 0.38 ms GEMM at 720 TFLOP/s) and
  cuBLAS reads it in its epilogue (hidden under the MMA work at this size). So the Triton route
  wins wherever Triton's GEMM is within about 3 % of cuBLAS, which is expected of its mma.sync
  loop on sm_8x, and the cuBLAS route wins where cuBLAS leads by more, which is expected on sm_90
  (warp-specialised TMA kernels against Triton's pipelined wgmma loop). "auto" follows that
  expectation (cuBLAS on sm_90 and newer, Triton on sm_8x); it was not measured here (no GPU), and
  `bench/kernels.py` can time both routes on the GPU at hand.

Dropout masks
  `kernels.common` defines the mask: element (m, k) of x's 2-D view is kept iff word k mod 4 of
  Philox4x32-10(key = seed, counter = m * 2*ceil(K/8) + k div 4) >= fp32(p) * 2**32. Choice, from
  the SASS for sm_90a (per element; test_packed_mask_is_cheaper_than_redrawing_philox): drawing
  costs 18 instructions with `randint4x` words (65 with one `tl.rand` per element, the old way),
  unpacking stored bits 4.5. Drawing in each of the three kernels that need the mask (xa, dA, dX)
  would cost 3 x 18-20 = 54-60 per element; drawing once and unpacking twice costs 27, for a mask
  of M*K/8 bytes (4 MB at 8192 x 4096: written once, read twice, about 4 us of H100 bandwidth)
  kept for the backward. The NF4 dX kernel reads the same packed bytes.
  With `seed=None` the Triton path draws a seed with torch's generator
  (`torch.randint(0, 2**31 - 1, (1,))`), so `torch.manual_seed` makes runs reproducible;
  `lora_linear_reference(..., seed=s)` applies the kernels' mask for seed s.

QLoRA
  With an `NF4Tensor` weight the base GEMMs are the NF4 ops (`pefomed::nf4_linear` with the LoRA
  term `xa B^T`, `pefomed::nf4_matmul_t` with `keep * (c g A)` from the packed mask); the adapter
  parts run as `pefomed::lora_project` and `pefomed::lora_adapter_backward`, the same kernels as
  the dense path.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from pefomed.kernels.common import gate_arch, keep_bits, mask_bytes, prune_for_device
from pefomed.kernels.nf4 import NF4Tensor, nf4_matmul, nf4_matmul_t, nf4_op_args

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SEED_RANGE = 2**31 - 1
BASE_GEMMS = ("triton", "cublas")
BASE_GEMM_ENV = "PEFOMED_LORA_BASE_GEMM"


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher fills by plain stores comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _accumulate(ptrs, value, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _mask_kernel(seed_ptr, mask_ptr, M, K, stride_mm, p, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """The packed mask alone (`dropout_mask`): the bytes `_project_kernel` stores."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    packed = mask_bytes(tl.load(seed_ptr), rm, rb, K, p)
    ok = (rm[:, None] < M) & (rb[None, :] < tl.cdiv(K, 8))
    tl.store(mask_ptr + rm.to(tl.int64)[:, None] * stride_mm + rb[None, :], packed.to(tl.uint8), mask=ok)


@triton.jit
def _project_kernel(
    x_ptr, a_ptr, out_ptr, mask_ptr, seed_ptr,
    M, K, R, K_SPLIT,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_os, stride_om, stride_mm,
    scale, p,
    DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[s, M, R] = scale * (keep * x)[M, this split's K] @ A[R, that K]^T; stores the mask bytes.

    x is loaded as [BLOCK_M, BLOCK_K/8, 8] tiles: 8 contiguous elements per thread (128-bit for
    bf16) line up with one mask byte, so the bits never leave the thread's registers.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    rm64 = rm.to(tl.int64)
    kb = tl.arange(0, BLOCK_K // 8)
    within = kb[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    k_start = pid_s * K_SPLIT
    k_stop = tl.minimum(K, k_start + K_SPLIT)
    x_rows = x_ptr + rm64[:, None, None] * stride_xm
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        cols = k0 + within
        x = tl.load(x_rows + cols.to(tl.int64) * stride_xk, mask=row_ok[:, None, None] & (cols < K), other=0.0)
        if DROPOUT:
            byte_cols = k0 // 8 + kb
            packed = mask_bytes(seed, rm, byte_cols, K, p)
            tl.store(
                mask_ptr + rm64[:, None] * stride_mm + byte_cols[None, :],
                packed.to(tl.uint8),
                mask=row_ok[:, None] & (byte_cols[None, :] < tl.cdiv(K, 8)),
            )
            x = tl.where(keep_bits(packed), x, 0.0)
        a_t = tl.load(
            a_ptr + rr[None, :] * stride_ar + (k0 + rk).to(tl.int64)[:, None] * stride_ak,
            mask=(rr[None, :] < R) & (k0 + rk < K)[:, None],
            other=0.0,
        )
        acc = tl.dot(tl.reshape(x, (BLOCK_M, BLOCK_K)), a_t, acc, input_precision=PRECISION)
    tl.store(
        out_ptr + pid_s.to(tl.int64) * stride_os + rm64[:, None] * stride_om + rr[None, :],
        acc * scale,
        mask=row_ok[:, None] & (rr[None, :] < R),
    )


@triton.jit
def _grads_kernel(
    dy_ptr, b_ptr, xa_ptr, g_ptr, db_ptr, dbias_ptr,
    M, N, R, ROWS_SPLIT,
    stride_dm, stride_dn, stride_bn, stride_br, stride_xam, stride_gs, stride_gm, stride_dbs, stride_dbn, stride_biass,
    g_scale,
    ATOMIC_G: tl.constexpr, ATOMIC_DB: tl.constexpr, HAS_DBIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One read of dY for g = g_scale dY B, dB = dY^T xa and dbias = sum_m dY.

    Program (n, s) owns columns [n*BLOCK_N, +BLOCK_N) and the rows of split s: its dB and dbias
    columns are complete over those rows (summed over the splits s), its g rows are partial over
    the column blocks n (summed over n).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    b = tl.load(
        b_ptr + rn64[:, None] * stride_bn + rr[None, :] * stride_br, mask=n_ok[:, None] & r_ok[None, :], other=0.0
    )
    db_acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_base = g_ptr if ATOMIC_G else g_ptr + pid_n.to(tl.int64) * stride_gs
    m_start = pid_s * ROWS_SPLIT
    m_stop = tl.minimum(M, m_start + ROWS_SPLIT)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        dy = tl.load(
            dy_ptr + rm64[:, None] * stride_dm + rn64[None, :] * stride_dn,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        xa = tl.load(xa_ptr + rm64[:, None] * stride_xam + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.dot(dy, b.to(dy.dtype), input_precision=PRECISION) * g_scale
        _accumulate(g_base + rm64[:, None] * stride_gm + rr[None, :], g, m_ok[:, None] & r_ok[None, :], ATOMIC_G)
        db_acc = tl.dot(tl.trans(dy), xa.to(dy.dtype), db_acc, input_precision=PRECISION)
        if HAS_DBIAS:
            bias_acc += tl.sum(dy.to(tl.float32), axis=0)
    db_base = db_ptr if ATOMIC_DB else db_ptr + pid_s.to(tl.int64) * stride_dbs
    _accumulate(db_base + rn64[:, None] * stride_dbn + rr[None, :], db_acc, n_ok[:, None] & r_ok[None, :], ATOMIC_DB)
    if HAS_DBIAS:
        bias_base = dbias_ptr if ATOMIC_DB else dbias_ptr + pid_s.to(tl.int64) * stride_biass
        _accumulate(bias_base + rn, bias_acc, n_ok, ATOMIC_DB)


@triton.jit
def _grad_a_kernel(
    x_ptr, g_ptr, mask_ptr, da_ptr,
    M, K, R, ROWS_SPLIT,
    stride_xm, stride_xk, stride_gm, stride_mm, stride_das, stride_dar,
    scale,
    DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dA[R, K] = scale * g[M, R]^T (keep * x)[M, K], one x read; computed as dA^T = x^T g so the
    MMA's M dimension is BLOCK_K (>= 64), not the rank."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    kb = tl.arange(0, BLOCK_K // 8)
    cols = pid_k * BLOCK_K + kb[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    col_ok = cols < K
    x_cols = x_ptr + cols.to(tl.int64) * stride_xk
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    m_start = pid_s * ROWS_SPLIT
    m_stop = tl.minimum(M, m_start + ROWS_SPLIT)
    for m0 in range(m_start, m_stop, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rm64 = rm.to(tl.int64)
        x = tl.load(x_cols + rm64[:, None, None] * stride_xm, mask=m_ok[:, None, None] & col_ok, other=0.0)
        if DROPOUT:
            byte_cols = pid_k * (BLOCK_K // 8) + kb
            packed = tl.load(
                mask_ptr + rm64[:, None] * stride_mm + byte_cols[None, :],
                mask=m_ok[:, None] & (byte_cols < tl.cdiv(K, 8))[None, :],
                other=0,
            )
            x = tl.where(keep_bits(packed), x, 0.0)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(tl.reshape(x, (BLOCK_M, BLOCK_K))), g.to(x.dtype), acc, input_precision=PRECISION)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    base = da_ptr if ATOMIC else da_ptr + pid_s.to(tl.int64) * stride_das
    _accumulate(base + rr[None, :] * stride_dar + rk[:, None], acc * scale, (rk < K)[:, None] & r_ok[None, :], ATOMIC)


@triton.jit
def _lora_term(
    left_ptr, right_ptr, mask_ptr, rm, rn, n0, N, m_ok, n_ok, R,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, left_scale,
    DTYPE: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """keep * ((left_scale * left[rm, :R]) @ right[:R, rn]) as an fp32 tile: the rank-r term, its
    left operand (fp32) scaled and cast to DTYPE before the dot (R <= 64: the launchers chunk)."""
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    left = tl.load(
        left_ptr + rm.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr,
        mask=m_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    right = tl.load(
        right_ptr + rr[:, None] * stride_rr + rn.to(tl.int64)[None, :] * stride_rn,
        mask=r_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    term = tl.dot((left * left_scale).to(DTYPE), right.to(DTYPE), input_precision=PRECISION)
    if DROPOUT:
        # The tile starts at column n0, a multiple of BLOCK_N (>= 8): its columns are whole mask bytes.
        byte_cols = n0 // 8 + tl.arange(0, BLOCK_N // 8)
        packed = tl.load(
            mask_ptr + rm.to(tl.int64)[:, None] * stride_mm + byte_cols[None, :],
            mask=m_ok[:, None] & (byte_cols < tl.cdiv(N, 8))[None, :],
            other=0,
        )
        term = tl.where(tl.reshape(keep_bits(packed), (BLOCK_M, BLOCK_N)), term, 0.0)
    return term


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, left_ptr, right_ptr, mask_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_bias,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_mm,
    left_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """c[M, N] = a[M, K] @ b[K, N] + bias + keep * (left_scale * left[M, R]) @ right[R, N].

    Forward: a = x, b = W^T, left = xa, right = B^T.  dX: a = dY, b = W, left = g, right = A,
    left_scale = 1/(1-p), keep = the packed mask. The rank-r term is the accumulator's initial
    value, so one fp32 tile is live. M_BUCKET only keys the autotuner.
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
    out_ty: tl.constexpr = c_ptr.dtype.element_ty
    if HAS_LORA:
        acc = _lora_term(left_ptr, right_ptr, mask_ptr, rm, rn, pid_n * BLOCK_N, N, m_ok, n_ok, R,
                         stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, left_scale,
                         a_ptr.dtype.element_ty, DROPOUT, R_PAD, PRECISION, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk + k0 < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(out_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _expand_kernel(
    c_ptr, bias_ptr, left_ptr, right_ptr, mask_ptr,
    M, N, R, M_BUCKET,
    stride_cm, stride_cn, stride_bias, stride_lm, stride_lr, stride_rr, stride_rn, stride_mm,
    left_scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """c[M, N] = bias + keep * (left_scale * left) @ right: what cuBLAS then adds a @ b to (beta = 1).
    ACCUMULATE adds to c instead (ranks above 64, one chunk of 64 per launch)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    out_ty: tl.constexpr = c_ptr.dtype.element_ty
    acc = _lora_term(left_ptr, right_ptr, mask_ptr, rm, rn, pid_n * BLOCK_N, N, m_ok, n_ok, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, left_scale,
                     out_ty, DROPOUT, R_PAD, PRECISION, BLOCK_M, BLOCK_N)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn.to(tl.int64) * stride_bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(out_ty), mask=m_ok[:, None] & n_ok[None, :])


# --- configurations ---------------------------------------------------------------------------
# The compile gate (`python -m pefomed.bench.static --only lora`) compiles every config below for
# sm_80, sm_86 and sm_90a (STATIC_CASES at the end of this file) and checks registers, spills,
# shared memory, the MMA kind and the load widths. A config that fails an arch is listed in that
# arch's EXCLUDE entry and pruned there at run time (`kernels.common.prune_for_device`).


def _gemm_config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
    )


# Base GEMM, Triton route: 128x256 and 256x128 tiles for the large token counts of training,
# narrower ones for small M and for sm_86's 99 KB of shared memory.
MATMUL_CONFIGS = [
    _gemm_config(*c)
    for c in ((128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 128, 32, 4, 4), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 3, 4), (64, 64, 64, 4, 4))
]  # fmt: skip
W4S4 = ",GROUP_M=8,w4,s4"
# From `python -m pefomed.bench.static --only lora`: these spill (or exceed 99 KB on sm_86) there.
MATMUL_EXCLUDE: dict[int, set[str]] = {  # forward: y = x W^T + xa B^T + b
    80: {"BLOCK_K=64,BLOCK_M=64,BLOCK_N=256" + W4S4, "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128" + W4S4},
    86: {"BLOCK_K=64,BLOCK_M=64,BLOCK_N=256" + W4S4, "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128" + W4S4},
}
MATMUL_DX_EXCLUDE: dict[int, set[str]] = {  # dX = dY W + keep * (g A) / (1-p): the mask adds registers
    80: {"BLOCK_K=64,BLOCK_M=128,BLOCK_N=256,GROUP_M=8,w8,s3", "BLOCK_K=64,BLOCK_M=256,BLOCK_N=128,GROUP_M=8,w8,s3",
         "BLOCK_K=64,BLOCK_M=128,BLOCK_N=128" + W4S4, "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128" + W4S4,
         "BLOCK_K=64,BLOCK_M=64,BLOCK_N=256" + W4S4},
    86: {"BLOCK_K=64,BLOCK_M=128,BLOCK_N=256,GROUP_M=8,w8,s3", "BLOCK_K=64,BLOCK_M=256,BLOCK_N=128,GROUP_M=8,w8,s3",
         "BLOCK_K=64,BLOCK_M=128,BLOCK_N=128" + W4S4, "BLOCK_K=64,BLOCK_M=64,BLOCK_N=256" + W4S4},
    90: {"BLOCK_K=64,BLOCK_M=128,BLOCK_N=128" + W4S4, "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128" + W4S4,
         "BLOCK_K=64,BLOCK_M=64,BLOCK_N=256" + W4S4},
}  # fmt: skip
# The rank-r expansion written before cuBLAS (cuBLAS route): a store-bound kernel.
EXPAND_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
    for bm, bn, w in ((128, 128, 8), (64, 256, 8), (64, 128, 4))
]
EXPAND_EXCLUDE: dict[int, set[str]] = {}
# The rank-r kernels are memory-bound: one configuration per arch, no autotuning (their atomics
# must not run twice). BLOCK_K / BLOCK_N are multiples of 8 (whole mask bytes).
RANK_CONFIGS: dict[int, dict[str, triton.Config]] = {
    90: {
        "project": triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        "grads": triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8, num_stages=3),
        "grad_a": triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    },
    80: {  # mma.sync keeps the rank-r operands in registers: 64 x 256 and 64 x 128 dY tiles spill here
        "project": triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        "grads": triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        "grad_a": triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    },
    86: {
        "project": triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        "grads": triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        "grad_a": triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=2),
    },
}
# The interpreter crashes on autotuning with more than one config, and small tiles keep it fast.
_INTERPRETER_CONFIGS = {
    "matmul": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}),
    "expand": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
    "project": triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
    "grads": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}),
    "grad_a": triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}),
}
_MASK_BLOCKS = (64, 16)  # dropout_mask: rows x bytes per program, 8 bytes (16 Philox calls) per thread
R_CHUNK = 64  # ranks per launch: the rank-r tiles are sized (and compile-gated) for r <= 64


def _arch(device: torch.device) -> int:
    """The gate arch of `device` (0: the interpreter)."""
    if _INTERPRET or device.type != "cuda":
        return 0
    return gate_arch(torch.cuda.get_device_capability(device))


def rank_config(arch: int, kernel: str) -> dict[str, int]:
    cfg = _INTERPRETER_CONFIGS[kernel] if arch == 0 else RANK_CONFIGS[arch][kernel]
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _autotuned(
    kernel: Any, name: str, configs: list[triton.Config], exclude: dict[int, set[str]], key: list[str]
) -> Any:
    # Both tuned kernels only store into their outputs, so the autotuner's repeated runs are harmless.
    if _INTERPRET:
        return triton.autotune(configs=[_INTERPRETER_CONFIGS[name]], key=key)(kernel)
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune_for_device(exclude)}
    )(kernel)


_matmul_tuned = _autotuned(_matmul_kernel, "matmul", MATMUL_CONFIGS, MATMUL_EXCLUDE, ["M_BUCKET", "N", "K"])
_matmul_dx_tuned = _autotuned(_matmul_kernel, "matmul", MATMUL_CONFIGS, MATMUL_DX_EXCLUDE, ["M_BUCKET", "N", "K"])
_expand_tuned = _autotuned(_expand_kernel, "expand", EXPAND_CONFIGS, EXPAND_EXCLUDE, ["M_BUCKET", "N", "R"])


# --- launch helpers ---------------------------------------------------------------------------


def _rank_pad(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two; masks cover the padding."""
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (tests patch this to exercise the split reductions)."""
    if device.type != "cuda":
        return 1
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _splits(blocks_other: int, blocks_split: int, device: torch.device) -> int:
    """Split a reduction of `blocks_split` blocks so that there are >= 2 programs per SM."""
    return max(1, min(blocks_split, triton.cdiv(2 * _sm_count(device), max(1, blocks_other))))


class _Sum(NamedTuple):
    """A reduction target: `buffer` [splits or 1, *shape], atomics or one slice per split."""

    buffer: torch.Tensor
    atomic: bool

    @property
    def split_stride(self) -> int:
        return 0 if self.atomic else self.buffer.stride(0)

    def result(self) -> torch.Tensor:
        return self.buffer[0] if self.buffer.shape[0] == 1 else self.buffer.sum(0)


def _sum_target(shape: tuple[int, ...], splits: int, device: torch.device) -> _Sum:
    if splits == 1:
        return _Sum(_new_output((1, *shape), torch.float32, device), atomic=False)
    if torch.are_deterministic_algorithms_enabled():  # a fixed summation order
        return _Sum(_new_output((splits, *shape), torch.float32, device), atomic=False)
    return _Sum(torch.zeros((1, *shape), dtype=torch.float32, device=device), atomic=True)


def mask_stride(k: int) -> int:
    """Bytes per row of the packed mask: ceil(K/8), every one of them written (a multiple of 16,
    so rows start 16-byte aligned for 128-bit loads, whenever K is a multiple of 128)."""
    return triton.cdiv(k, 8)


def resolve_base_gemm(base_gemm: str | None, device: torch.device) -> str:
    """'triton' or 'cublas' for `base_gemm` (None: $PEFOMED_LORA_BASE_GEMM, else 'auto')."""
    choice = base_gemm or os.environ.get(BASE_GEMM_ENV) or "auto"
    if choice == "auto":
        return "cublas" if _arch(device) >= 90 else "triton"
    if choice not in BASE_GEMMS:
        source = "base_gemm" if base_gemm else f"${BASE_GEMM_ENV}"
        raise ValueError(f"kernels.lora: {source}={choice!r}; expected one of {[*BASE_GEMMS, 'auto']}")
    return choice


def _rank_chunks(r: int) -> list[slice]:
    return [slice(r0, min(r, r0 + R_CHUNK)) for r0 in range(0, r, R_CHUNK)] or [slice(0, 0)]


def _project(
    x: torch.Tensor, a: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [M, R] = scale * (keep * x) @ a^T, packed mask [M, mask_stride(K)] uint8 or empty)."""
    if a.shape[0] > R_CHUNK:  # every chunk draws (and stores) the same mask
        parts = [_project(x, a[c], scale, dropout_p, seed) for c in _rank_chunks(a.shape[0])]
        return torch.cat([xa for xa, _ in parts], dim=1), parts[0][1]
    m, k = x.shape
    r = a.shape[0]
    arch = _arch(x.device)
    cfg = rank_config(arch, "project")
    dropout = dropout_p > 0
    if dropout and seed is None:
        raise ValueError("kernels.lora: dropout_p > 0 needs a seed tensor (int64, 1 element)")
    mask = _new_output((m, mask_stride(k)) if dropout else (0,), torch.uint8, x.device)
    row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    k_blocks = triton.cdiv(k, cfg["BLOCK_K"])
    splits = _splits(row_blocks, k_blocks, x.device)
    k_split = triton.cdiv(k_blocks, splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(k, k_split) if k else 1
    partial = _new_output((splits, m, r), torch.float32, x.device)
    if m and k:
        _project_kernel[(row_blocks, splits)](
            x, a, partial, mask, seed if dropout else x,
            m, k, r, k_split,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), partial.stride(0), partial.stride(1),
            mask.stride(0) if dropout else 0,
            scale, dropout_p,
            DROPOUT=dropout, R_PAD=_rank_pad(r), PRECISION=_precision(x.dtype), **cfg,
        )  # fmt: skip
    elif m:
        partial.zero_()
    return (partial[0] if splits == 1 else partial.sum(0)), mask


def _grads(
    dy: torch.Tensor, b: torch.Tensor, xa: torch.Tensor, g_scale: float, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(g = g_scale dY B [M, R], dB = dY^T xa [N, R], dbias = sum_m dY [N] or None), fp32, one dY read
    (per chunk of 64 ranks)."""
    if b.shape[1] > R_CHUNK:
        parts = [_grads(dy, b[:, c], xa[:, c], g_scale, need_dbias and c.start == 0) for c in _rank_chunks(b.shape[1])]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1), parts[0][2]
    m, n = dy.shape
    r = b.shape[1]
    cfg = rank_config(_arch(dy.device), "grads")
    col_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    splits = _splits(col_blocks, row_blocks, dy.device)
    rows_split = triton.cdiv(row_blocks, splits) * cfg["BLOCK_M"]
    splits = max(1, triton.cdiv(m, rows_split))
    g = _sum_target((m, r), col_blocks, dy.device)
    db = _sum_target((n, r), splits, dy.device)
    dbias = _sum_target((n,), splits, dy.device) if need_dbias else None
    if m == 0:
        for t in (g, db, dbias):
            if t is not None:
                t.buffer.zero_()
    else:
        _grads_kernel[(col_blocks, splits)](
            dy, b, xa, g.buffer, db.buffer, dbias.buffer if dbias is not None else db.buffer,
            m, n, r, rows_split,
            dy.stride(0), dy.stride(1), b.stride(0), b.stride(1), xa.stride(0),
            g.split_stride, g.buffer.stride(1), db.split_stride, db.buffer.stride(1),
            dbias.split_stride if dbias is not None else 0,
            g_scale,
            ATOMIC_G=g.atomic, ATOMIC_DB=db.atomic, HAS_DBIAS=need_dbias,
            R_PAD=_rank_pad(r), PRECISION=_precision(dy.dtype), **cfg,
        )  # fmt: skip
    return g.result(), db.result(), dbias.result() if dbias is not None else None


def _grad_a(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, scale: float, dropout: bool) -> torch.Tensor:
    """fp32 [R, K] = scale * g^T (keep * x), one x read (per chunk of 64 ranks)."""
    if g.shape[1] > R_CHUNK:
        return torch.cat([_grad_a(x, g[:, c], mask, scale, dropout) for c in _rank_chunks(g.shape[1])], dim=0)
    m, k = x.shape
    r = g.shape[1]
    cfg = rank_config(_arch(x.device), "grad_a")
    col_blocks = triton.cdiv(k, cfg["BLOCK_K"])
    row_blocks = triton.cdiv(m, cfg["BLOCK_M"])
    splits = _splits(col_blocks, row_blocks, x.device)
    rows_split = triton.cdiv(row_blocks, splits) * cfg["BLOCK_M"]
    splits = max(1, triton.cdiv(m, rows_split))
    da = _sum_target((r, k), splits, x.device)
    if m == 0 or k == 0:
        da.buffer.zero_()
    else:
        _grad_a_kernel[(col_blocks, splits)](
            x, g, mask if dropout else x, da.buffer,
            m, k, r, rows_split,
            x.stride(0), x.stride(1), g.stride(0), mask.stride(0) if dropout else 0,
            da.split_stride, da.buffer.stride(1),
            scale,
            DROPOUT=dropout, ATOMIC=da.atomic, R_PAD=_rank_pad(r), PRECISION=_precision(x.dtype), **cfg,
        )  # fmt: skip
    return da.result()


def _rank_term_args(
    left: torch.Tensor | None, right: torch.Tensor | None, mask: torch.Tensor | None, out: torch.Tensor
) -> tuple:
    if left is None:
        return out, out, out, 1, 0, 0, 0, 0, 0
    stride_mm = mask.stride(0) if mask is not None else 0
    return (left, right, mask if mask is not None else out, left.shape[1],
            left.stride(0), left.stride(1), right.stride(0), right.stride(1), stride_mm)  # fmt: skip


def _matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
    bias: torch.Tensor | None, left: torch.Tensor | None, right: torch.Tensor | None, left_scale: float,
    mask: torch.Tensor | None, dx: bool = False,
) -> torch.Tensor:  # fmt: skip
    """out = a @ b + bias + keep * (left_scale * left) @ right with the Triton GEMM; a, b, right
    are any strided views (W^T and B^T are transposed views, never copies); rank <= 64."""
    m, n = out.shape
    left_t, right_t, mask_t, r, s_lm, s_lr, s_rr, s_rn, s_mm = _rank_term_args(left, right, mask, out)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if m == 0 or n == 0:
        return out
    (_matmul_dx_tuned if dx else _matmul_tuned)[grid](
        a, b, out, bias if bias is not None else out, left_t, right_t, mask_t,
        m, n, a.shape[1], r, triton.next_power_of_2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 0, s_lm, s_lr, s_rr, s_rn, s_mm,
        left_scale,
        HAS_BIAS=bias is not None, HAS_LORA=left is not None, DROPOUT=mask is not None,
        R_PAD=_rank_pad(r), PRECISION=_precision(out.dtype),
    )  # fmt: skip
    return out


def _expand(
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
    left_scale: float,
    mask: torch.Tensor | None,
    accumulate: bool = False,
) -> torch.Tensor:
    """out (+)= bias + keep * (left_scale * left) @ right, the term cuBLAS then adds a GEMM to; rank <= 64."""
    m, n = out.shape
    left_t, right_t, mask_t, r, s_lm, s_lr, s_rr, s_rn, s_mm = _rank_term_args(left, right, mask, out)

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    if m == 0 or n == 0:
        return out
    _expand_tuned[grid](
        out, bias if bias is not None else out, left_t, right_t, mask_t,
        m, n, r, triton.next_power_of_2(m),
        out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0, s_lm, s_lr, s_rr, s_rn, s_mm,
        left_scale,
        HAS_BIAS=bias is not None, DROPOUT=mask is not None, ACCUMULATE=accumulate, R_PAD=_rank_pad(r),
        PRECISION=_precision(out.dtype),
    )  # fmt: skip
    return out


def _gemm_with_lora(
    route: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
    bias: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor, left_scale: float,
    mask: torch.Tensor | None, dx: bool,
) -> torch.Tensor:  # fmt: skip
    """out = a @ b + bias + keep * (left_scale * left) @ right on the chosen base-GEMM route.

    The first 64 ranks ride with the GEMM (its initial accumulator, or the expansion cuBLAS adds
    onto); ranks beyond, in chunks of 64, are added by accumulating expansions, so every rank-r
    tile is the one the compile gate checks at r = 64.
    """
    first, *rest = _rank_chunks(left.shape[1])
    if route == "cublas":
        _expand(out, bias=bias, left=left[:, first], right=right[first], left_scale=left_scale, mask=mask)
    else:
        _matmul(a, b, out, bias=bias, left=left[:, first], right=right[first], left_scale=left_scale, mask=mask, dx=dx)
    for c in rest:
        _expand(out, bias=None, left=left[:, c], right=right[c], left_scale=left_scale, mask=mask, accumulate=True)
    if route == "cublas" and a.shape[1]:
        out.addmm_(a, b)
    return out


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"kernels.lora: the Triton path runs on CUDA tensors, got {device}; use `kernels: torch` "
            "(kernels.lora.lora_linear_reference) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
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
            raise ValueError(
                f"kernels.lora: the NF4 base weight must be the [out, in] weight, not a transposed view: {weight!r}"
            )
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
    if r < 1:
        raise ValueError(f"kernels.lora: lora_A has rank {r}; a LoRA adapter needs r >= 1")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"kernels.lora: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"kernels.lora: bias has shape {list(bias.shape)}, expected [{out_features}]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"kernels.lora: dropout_p must be in [0, 1), got {dropout_p}")
    devices = {t.device for t in (x, lora_A, lora_B, bias, weight) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"kernels.lora: x, weight, lora_A, lora_B and bias are on different devices {sorted(map(str, devices))}"
        )
    _check_device(x.device)


# --- launchers --------------------------------------------------------------------------------


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lora_project(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(xa, mask)` for 2-D x [M, in]: xa = scaling/(1-p) * (keep * x) A^T [M, r] in fp32 and the
    packed keep-mask [M, mask_stride(in)] uint8 drawn from `seed` (empty without dropout)."""
    _check_device(x.device)
    return _project(x, _as(lora_A, x.dtype), scaling / (1.0 - dropout_p), dropout_p, seed)


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
    base_gemm: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(y, xa, mask)` for 2-D x [M, in]: y [M, out] in x's dtype (written into `out` if given),
    xa and the packed mask as `lora_project` returns them (what `lora_backward` takes).

    `weight` is dense or an NF4Tensor; `seed` (int64, 1 element, on x's device) is needed when
    dropout_p > 0; `base_gemm` picks the dense base GEMM (see the module docstring).
    """
    m, _ = x.shape
    n = lora_B.shape[0]
    b = _as(lora_B, x.dtype)
    xa, mask = lora_project(x, lora_A, scaling, dropout_p, seed)
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(
            f"kernels.lora: out must be {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} {list(out.shape)}"
        )
    if isinstance(weight, NF4Tensor):
        y = nf4_matmul(x, weight, bias, lora_xa=xa, lora_b=b, scaling=1.0)
        return (y if out is None else out.copy_(y)), xa, mask
    if out is None:
        out = _new_output((m, n), x.dtype, x.device)
    # W^T [in, out] and B^T [r, out] are transposed views: read through their strides, never copied.
    _gemm_with_lora(resolve_base_gemm(base_gemm, x.device), x, weight.t(), out,
                    bias=bias, left=xa, right=b.t(), left_scale=1.0, mask=None, dx=False)  # fmt: skip
    return out, xa, mask


def lora_adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    need_dbias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(dA, dB, g, dbias)` in fp32 for 2-D dy [M, out]: g = scaling dY B [M, r] is what the dX
    GEMM's LoRA term takes (times 1/(1-p) and the mask); dbias is None unless asked for."""
    _check_device(dy.device)
    dropout = dropout_p > 0
    if dropout and mask.shape != (x.shape[0], mask_stride(x.shape[1])):
        raise ValueError(
            f"kernels.lora: the packed mask must be [{x.shape[0]}, {mask_stride(x.shape[1])}] uint8, got {list(mask.shape)}"
        )
    g, d_b, d_bias = _grads(dy, _as(lora_B, dy.dtype), xa, scaling, need_dbias)
    d_a = _grad_a(x, g, mask, 1.0 / (1.0 - dropout_p), dropout)
    return d_a, d_b, g, d_bias


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    need_dx: bool = True,
    need_dbias: bool = False,
    base_gemm: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(dx, dA, dB, dbias)` for 2-D dy [M, out]: dx in x's dtype (None unless need_dx), the rest
    fp32 (dbias None unless need_dbias). `seed` is only read by the NF4 dX kernel."""
    a = _as(lora_A, x.dtype)
    d_a, d_b, g, d_bias = lora_adapter_backward(dy, x, a, lora_B, xa, mask, scaling, dropout_p, need_dbias)
    if not need_dx:
        return None, d_a, d_b, d_bias
    if isinstance(weight, NF4Tensor):
        keep = mask if dropout_p > 0 else None
        return nf4_matmul_t(dy, weight, lora_g=g, lora_a=a, seed=seed, dropout_p=dropout_p, mask=keep), d_a, d_b, d_bias
    dx = _new_output(tuple(x.shape), x.dtype, x.device)
    _gemm_with_lora(resolve_base_gemm(base_gemm, x.device), dy, weight, dx, bias=None, left=g, right=a,
                    left_scale=1.0 / (1.0 - dropout_p), mask=mask if dropout_p > 0 else None, dx=True)  # fmt: skip
    return dx, d_a, d_b, d_bias


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Packed mask [M, mask_stride(k)] -> bool keep-mask [M, k]."""
    bits = (packed[:, :, None].to(torch.int32) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k].bool()


def dropout_mask(
    seed: int | torch.Tensor, shape: tuple[int, ...] | torch.Size, p: float, device: Any = None
) -> torch.Tensor:
    """The kernels' keep-mask (bool, True = kept) for an x of `shape` and dropout `p`.

    Element index = position in the row-major 2-D view [prod(shape[:-1]), shape[-1]]. Runs the
    same Philox draw as the kernels, so it needs Triton (a GPU, or TRITON_INTERPRET=1 on CPU).
    """
    seed_t = _seed_tensor(seed, torch.device(device) if device is not None else None)
    _check_device(seed_t.device)
    shape = tuple(shape)
    k = shape[-1] if shape else 1
    m = int(torch.Size(shape[:-1]).numel()) if shape else 1
    packed = _new_output((m, mask_stride(k)), torch.uint8, seed_t.device)
    block_m, block_b = (16, 16) if _INTERPRET else _MASK_BLOCKS
    if m and k:
        _mask_kernel[(triton.cdiv(m, block_m), triton.cdiv(triton.cdiv(k, 8), block_b))](
            seed_t, packed, m, k, packed.stride(0), p, BLOCK_M=block_m, BLOCK_B=block_b
        )
    return unpack_mask(packed, k).reshape(shape)


def _seed_tensor(seed: int | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point:
            raise ValueError(f"kernels.lora: seed tensor must hold one integer, got {seed.dtype} {list(seed.shape)}")
        return seed.reshape(1).to(device=device if device is not None else seed.device, dtype=torch.int64)
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"kernels.lora: seed must be a non-negative int below 2**63, got {seed}")
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


# --- torch.library ops (opaque to torch.compile, traced through their fake impls) -------------
# Every output is a new contiguous tensor, and the fake implementations say so, so inductor's
# stride assertions hold.


def _empty_mask(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    shape = (x.shape[0], mask_stride(x.shape[1])) if dropout_p > 0 else (0,)
    return x.new_empty(shape, dtype=torch.uint8)


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
    base_gemm: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, base_gemm=base_gemm)


@_forward_op.register_fake
def _(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, base_gemm):
    m = x.shape[0]
    return (
        x.new_empty((m, lora_B.shape[0])),
        x.new_empty((m, lora_A.shape[0]), dtype=torch.float32),
        _empty_mask(x, dropout_p),
    )


@torch.library.custom_op("pefomed::lora_linear_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dbias: bool,
    base_gemm: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, d_a, d_b, d_bias = lora_backward(
        dy, x, weight, lora_A, lora_B, xa, mask, scaling, dropout_p, None, need_dx, need_dbias, base_gemm
    )
    # A custom op cannot return None: an empty tensor stands for "not asked for".
    return (
        dx if dx is not None else x.new_empty(0),
        d_a,
        d_b,
        d_bias if d_bias is not None else dy.new_empty(0, dtype=torch.float32),
    )


@_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, mask, scaling, dropout_p, need_dx, need_dbias, base_gemm):
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        x.new_empty(lora_A.shape, dtype=torch.float32),
        x.new_empty(lora_B.shape, dtype=torch.float32),
        dy.new_empty((dy.shape[1],) if need_dbias else (0,), dtype=torch.float32),
    )


# The adapter-only halves: with an NF4 base weight, the pefomed::nf4_* ops do the base GEMMs.


@torch.library.custom_op("pefomed::lora_project", mutates_args=())
def _project_op(
    x: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor | None, scaling: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_project(x, lora_A, scaling, dropout_p, seed)


@_project_op.register_fake
def _(x, lora_A, seed, scaling, dropout_p):
    return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32), _empty_mask(x, dropout_p)


@torch.library.custom_op("pefomed::lora_adapter_backward", mutates_args=())
def _adapter_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d_a, d_b, g, d_bias = lora_adapter_backward(dy, x, lora_A, lora_B, xa, mask, scaling, dropout_p, need_dbias)
    return d_a, d_b, g, d_bias if d_bias is not None else dy.new_empty(0, dtype=torch.float32)


@_adapter_backward_op.register_fake
def _(dy, x, lora_A, lora_B, xa, mask, scaling, dropout_p, need_dbias):
    return (
        x.new_empty(lora_A.shape, dtype=torch.float32),
        x.new_empty(lora_B.shape, dtype=torch.float32),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32),
        dy.new_empty((dy.shape[1],) if need_dbias else (0,), dtype=torch.float32),
    )


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
        base_gemm: str,
    ) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        # The adapters in x's dtype, once per step: the forward's dots and the backward's reuse them.
        a, b = _as(lora_A, x.dtype), _as(lora_B, x.dtype)
        if isinstance(weight, NF4Tensor):
            xa, mask = torch.ops.pefomed.lora_project(x2d, a, seed, scaling, dropout_p)
            y = torch.ops.pefomed.nf4_linear(x2d, *nf4_op_args(weight), bias, xa, b, 1.0)
        else:
            y, xa, mask = torch.ops.pefomed.lora_linear_forward(
                x2d, weight, a, b, bias, seed, scaling, dropout_p, base_gemm
            )
        # The weight is saved by reference (no copy, no cast, NF4 stays NF4); xa is M x r floats,
        # the mask M*K/8 bytes.
        ctx.save_for_backward(x2d, weight, a, b, xa, mask, seed)
        ctx.scaling, ctx.dropout_p, ctx.base_gemm, ctx.x_shape = scaling, dropout_p, base_gemm, x.shape
        ctx.dtypes = (lora_A.dtype, lora_B.dtype, bias.dtype if bias is not None else None)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        need_dx, _, need_da, need_db, need_dbias = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(-1, dy.shape[-1])
        x2d, weight, a, b, xa, mask, seed = ctx.saved_tensors
        if isinstance(weight, NF4Tensor):
            d_a, d_b, g, d_bias = torch.ops.pefomed.lora_adapter_backward(
                dy2d, x2d, a, b, xa, mask, ctx.scaling, ctx.dropout_p, need_dbias
            )
            if need_dx:
                keep = mask if ctx.dropout_p > 0 else None  # the packed mask: no Philox in the dX kernel
                dx = torch.ops.pefomed.nf4_matmul_t(dy2d, *nf4_op_args(weight), g, a, seed, ctx.dropout_p, keep)
        else:
            dx, d_a, d_b, d_bias = torch.ops.pefomed.lora_linear_backward(
                dy2d, x2d, weight, a, b, xa, mask, ctx.scaling, ctx.dropout_p, need_dx, need_dbias, ctx.base_gemm
            )
        a_dtype, b_dtype, bias_dtype = ctx.dtypes
        return (
            dx.reshape(ctx.x_shape) if need_dx else None,
            None,
            d_a.to(a_dtype) if need_da else None,
            d_b.to(b_dtype) if need_db else None,
            d_bias.to(bias_dtype) if need_dbias else None,
            None,
            None,
            None,
            None,
        )


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
    base_gemm: str | None = None,
) -> torch.Tensor:
    """`x W^T + b + scaling * dropout(x) A^T B^T` for x [..., in], fused in Triton.

    Dropout is active when `training` and `dropout_p > 0`; its mask comes from `seed` (int or a
    1-element integer tensor), or from a seed drawn with torch's generator when `seed` is None.
    The base `weight` must be frozen; it is dense (x's dtype) or an `NF4Tensor` (QLoRA).
    `base_gemm`: "triton", "cublas" or "auto" (default: $PEFOMED_LORA_BASE_GEMM, else "auto").
    """
    _check_inputs(x, weight, lora_A, lora_B, bias, dropout_p)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "kernels.lora.lora_linear: the base weight requires grad, but this kernel trains only "
            "lora_A / lora_B (and bias); freeze it with weight.requires_grad_(False)"
        )
    route = resolve_base_gemm(base_gemm, x.device)
    active = training and dropout_p > 0
    if not active:
        seed_t, dropout_p = None, 0.0
    elif seed is None:
        seed_t = torch.randint(0, _SEED_RANGE, (1,), device=x.device, dtype=torch.int64)
    else:
        seed_t = _seed_tensor(seed, x.device)
    return LoRALinearFunction.apply(x, weight, lora_A, lora_B, bias, seed_t, float(scaling), float(dropout_p), route)


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


# --- compile gate -----------------------------------------------------------------------------


def STATIC_CASES() -> list:  # noqa: N802 (the gate's protocol name)
    """What the launchers compile, at the engine's shapes (LLaMA-7B q/v: 8192 tokens x 4096 -> 4096,
    r = 64, dropout 0.05, bf16 activations; the adapters cast to bf16, xa and g in fp32)."""
    from pefomed.bench.static import Ptr, StaticCase

    bf16, f32, u8, i64 = torch.bfloat16, torch.float32, torch.uint8, torch.int64
    m, n, k, r = 8192, 4096, 4096, 64
    mk = mask_stride(k)

    def rank(name: str):
        return lambda arch: [RANK_CONFIGS[arch][name]]

    cases = [
        StaticCase(
            name="lora.mask",
            kernel=_mask_kernel,
            args={"seed_ptr": Ptr(i64), "mask_ptr": Ptr(u8), "M": m, "K": k, "stride_mm": mk, "p": 0.05},
            configs=[triton.Config({"BLOCK_M": _MASK_BLOCKS[0], "BLOCK_B": _MASK_BLOCKS[1]}, num_warps=4)],
        )
    ]
    for dropout in (False, True):
        tag = "drop" if dropout else "nodrop"
        cases += [
            StaticCase(
                name=f"lora.project.{tag}",
                kernel=_project_kernel,
                args={
                    "x_ptr": Ptr(bf16), "a_ptr": Ptr(bf16), "out_ptr": Ptr(f32), "mask_ptr": Ptr(u8), "seed_ptr": Ptr(i64),
                    "M": m, "K": k, "R": r, "K_SPLIT": k // 4,
                    "stride_xm": k, "stride_xk": 1, "stride_ar": k, "stride_ak": 1, "stride_os": m * r, "stride_om": r,
                    "stride_mm": mk, "scale": 0.25 / 0.95, "p": 0.05,
                    "DROPOUT": dropout, "R_PAD": r, "PRECISION": "tf32",
                },
                configs=rank("project"), mma="bf16", streaming=True,
            ),
            StaticCase(
                name=f"lora.grad_a.{tag}",
                kernel=_grad_a_kernel,
                args={
                    "x_ptr": Ptr(bf16), "g_ptr": Ptr(f32), "mask_ptr": Ptr(u8), "da_ptr": Ptr(f32),
                    "M": m, "K": k, "R": r, "ROWS_SPLIT": m // 8,
                    "stride_xm": k, "stride_xk": 1, "stride_gm": r, "stride_mm": mk, "stride_das": 0, "stride_dar": k,
                    "scale": 1 / 0.95, "DROPOUT": dropout, "ATOMIC": True, "R_PAD": r, "PRECISION": "tf32",
                },
                configs=rank("grad_a"), mma="bf16", streaming=True,
            ),
        ]  # fmt: skip
    for atomic in (True, False):
        cases.append(
            StaticCase(
                name=f"lora.grads.{'atomic' if atomic else 'deterministic'}",
                kernel=_grads_kernel,
                args={
                    "dy_ptr": Ptr(bf16), "b_ptr": Ptr(bf16), "xa_ptr": Ptr(f32), "g_ptr": Ptr(f32), "db_ptr": Ptr(f32),
                    "dbias_ptr": Ptr(f32), "M": m, "N": n, "R": r, "ROWS_SPLIT": m // 16,
                    "stride_dm": n, "stride_dn": 1, "stride_bn": r, "stride_br": 1, "stride_xam": r,
                    "stride_gs": 0 if atomic else m * r, "stride_gm": r, "stride_dbs": 0 if atomic else n * r,
                    "stride_dbn": r, "stride_biass": 0 if atomic else n, "g_scale": 0.25,
                    "ATOMIC_G": atomic, "ATOMIC_DB": atomic, "HAS_DBIAS": not atomic, "R_PAD": r, "PRECISION": "tf32",
                },
                configs=rank("grads"), mma="bf16", streaming=True,
            )
        )  # fmt: skip
    term = {"R": r, "M_BUCKET": m, "R_PAD": r, "PRECISION": "tf32", "stride_lm": r, "stride_lr": 1}
    fwd = {"stride_rr": 1, "stride_rn": r, "stride_mm": 0, "left_scale": 1.0, "DROPOUT": False}  # right = B^T
    dx = {"stride_rr": k, "stride_rn": 1, "stride_mm": mk, "left_scale": 1 / 0.95, "DROPOUT": True}  # right = A
    ptrs = {"left_ptr": Ptr(f32), "right_ptr": Ptr(bf16), "mask_ptr": Ptr(u8), "bias_ptr": Ptr(bf16)}
    cases += [
        StaticCase(
            name="lora.matmul.fwd",  # y = x W^T + xa B^T (+ bias)
            kernel=_matmul_tuned,
            args={"a_ptr": Ptr(bf16), "b_ptr": Ptr(bf16), "c_ptr": Ptr(bf16), **ptrs, "M": m, "N": n, "K": k,
                  "stride_am": k, "stride_ak": 1, "stride_bk": 1, "stride_bn": k, "stride_cm": n, "stride_cn": 1,
                  "stride_bias": 1, "HAS_BIAS": True, "HAS_LORA": True, **term, **fwd},
            mma="bf16", streaming=True,
        ),
        StaticCase(
            name="lora.matmul.dx",  # dX = dY W + keep * (g A) / (1-p)
            kernel=_matmul_dx_tuned,
            args={"a_ptr": Ptr(bf16), "b_ptr": Ptr(bf16), "c_ptr": Ptr(bf16), **ptrs, "M": m, "N": k, "K": n,
                  "stride_am": n, "stride_ak": 1, "stride_bk": k, "stride_bn": 1, "stride_cm": k, "stride_cn": 1,
                  "stride_bias": 1, "HAS_BIAS": False, "HAS_LORA": True, **term, **dx},
            mma="bf16", streaming=True,
        ),
        StaticCase(
            name="lora.expand.fwd",  # xa B^T + bias, before cuBLAS adds x W^T
            kernel=_expand_tuned,
            args={"c_ptr": Ptr(bf16), **ptrs, "M": m, "N": n, "stride_cm": n, "stride_cn": 1, "stride_bias": 1,
                  "HAS_BIAS": True, "ACCUMULATE": False, **term, **fwd},
            mma="bf16",
        ),
        StaticCase(
            name="lora.expand.dx",  # keep * (g A) / (1-p), before cuBLAS adds dY W
            kernel=_expand_tuned,
            args={"c_ptr": Ptr(bf16), **ptrs, "M": m, "N": k, "stride_cm": k, "stride_cn": 1, "stride_bias": 1,
                  "HAS_BIAS": False, "ACCUMULATE": False, **term, **dx},
            mma="bf16",
        ),
        StaticCase(
            name="lora.expand.accumulate",  # ranks 65.. of r > 64, added onto dX
            kernel=_expand_tuned,
            args={"c_ptr": Ptr(bf16), **ptrs, "M": m, "N": k, "stride_cm": k, "stride_cn": 1, "stride_bias": 1,
                  "HAS_BIAS": False, "ACCUMULATE": True, **term, **dx},
            mma="bf16",
        ),
    ]  # fmt: skip
    return cases
