"""Grouped visual-token projection (MiniGPT-v2's connector) as one Triton GEMM.

`grouped_projection(feats, weight, bias, group=4, layout="sequence", drop_cls=True, out=None,
row_index=None)` computes `Linear(group*D -> out_dim)` over groups of visual tokens:
- "sequence": MiniGPT-v2's rule, `group` consecutive tokens in raster order;
- "spatial": 2x2 neighbours on the patch grid (pixel-shuffle): output token (i, j) concatenates
  patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), in that order.

The grouping is address arithmetic inside the kernel's A-tile loads (output row + K index ->
batch, token, channel), so the features are never copied or reshaped. With `out` and
`row_index`, the projected rows are written straight into `out` (e.g. the LLM's flattened
input-embedding sequence) at the image placeholder rows, so no `torch.cat` of text and image
embeddings is needed. Backward gives the weight and bias gradients and, when `feats` requires
grad (LoRA inside the ViT), the features' gradient through the same index arithmetic.
The plain PyTorch version is `kernels.reference.grouped_projection_reference`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.common import dot_acc
from kernels.reference import grouped_projection_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M, BLOCK_N, BLOCK_K = (16, 16, 16) if INTERPRET else (64, 128, 32)


@triton.jit
def _token_offsets(rows, ks, n_groups, D, side, stride_b, stride_t, stride_d, cls_offset,
                   GROUP: tl.constexpr, SPATIAL: tl.constexpr):
    """Element offsets into feats for output rows `rows` and concatenated channels `ks`."""
    b = rows // n_groups
    t = rows % n_groups
    g = ks // D
    c = ks % D
    if SPATIAL:
        half = side // 2
        i = t // half
        j = t % half
        tok = (2 * i[:, None] + g[None, :] // 2) * side + 2 * j[:, None] + g[None, :] % 2
    else:
        tok = t[:, None] * GROUP + g[None, :]
    return b[:, None] * stride_b + (tok + cls_offset) * stride_t + c[None, :] * stride_d


@triton.jit
def _forward_kernel(feats, weight, bias, out, row_index, R, N, K, n_groups, D, side,
                    stride_b, stride_t, stride_d, stride_wn, stride_wk, stride_om, cls_offset,
                    GROUP: tl.constexpr, SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
                    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a_off = _token_offsets(rows, ks, n_groups, D, side, stride_b, stride_t, stride_d, cls_offset, GROUP, SPATIAL)
        a = tl.load(feats + a_off, mask=(rows[:, None] < R) & (ks[None, :] < K), other=0.0).to(tl.float32)
        w = tl.load(weight + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0).to(tl.float32)
        acc = dot_acc(acc, a, w, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_INDEX:
        dest = tl.load(row_index + rows, mask=rows < R, other=0)
    else:
        dest = rows
    tl.store(out + dest[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < R) & (cols[None, :] < N))


@triton.jit
def _grad_weight_kernel(feats, dy, dw, R, N, K, n_groups, D, side, stride_b, stride_t, stride_d, stride_dym,
                        cls_offset, GROUP: tl.constexpr, SPATIAL: tl.constexpr, IEEE: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dW[n, k] = sum_m dY[m, n] * A[m, k], with A gathered from feats in the loads."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, R, BM):
        rows = m0 + tl.arange(0, BM)
        a_off = _token_offsets(rows, ks, n_groups, D, side, stride_b, stride_t, stride_d, cls_offset, GROUP, SPATIAL)
        a = tl.load(feats + a_off, mask=(rows[:, None] < R) & (ks[None, :] < K), other=0.0).to(tl.float32)
        g = tl.load(dy + rows[:, None] * stride_dym + cols[None, :],
                    mask=(rows[:, None] < R) & (cols[None, :] < N), other=0.0).to(tl.float32)
        acc = dot_acc(acc, tl.trans(g), a, IEEE)
    tl.store(dw + cols[:, None] * K + ks[None, :], acc, mask=(cols[:, None] < N) & (ks[None, :] < K))


@triton.jit
def _grad_feats_kernel(dy, weight, dfeats, R, N, K, n_groups, D, side, stride_b, stride_t, stride_d,
                       stride_dym, stride_wn, stride_wk, cls_offset, GROUP: tl.constexpr, SPATIAL: tl.constexpr,
                       IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """dA = dY @ W, scattered back to the feature positions it was gathered from."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ks = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        g = tl.load(dy + rows[:, None] * stride_dym + cols[None, :],
                    mask=(rows[:, None] < R) & (cols[None, :] < N), other=0.0).to(tl.float32)
        w = tl.load(weight + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0).to(tl.float32)
        acc = dot_acc(acc, g, w, IEEE)
    off = _token_offsets(rows, ks, n_groups, D, side, stride_b, stride_t, stride_d, cls_offset, GROUP, SPATIAL)
    tl.store(dfeats + off, acc.to(dfeats.dtype.element_ty), mask=(rows[:, None] < R) & (ks[None, :] < K))


def _geometry(feats: torch.Tensor, weight: torch.Tensor, group: int, layout: str, drop_cls: bool):
    if feats.dim() != 3:
        raise ValueError(f"feats must be [B, tokens, D], got shape {list(feats.shape)}")
    b, tokens, d = feats.shape
    n = tokens - (1 if drop_cls else 0)
    if n <= 0 or n % group:
        raise ValueError(f"{n} visual tokens (after dropping CLS: {drop_cls}) cannot be grouped by {group}")
    side = int(round(n**0.5))
    if layout == "spatial" and (group != 4 or side * side != n or side % 2):
        raise ValueError(f"the spatial layout needs group 4 and an even square grid, got {n} tokens")
    if layout not in ("sequence", "spatial"):
        raise ValueError(f"layout {layout!r}: expected 'sequence' or 'spatial'")
    if weight.dim() != 2 or weight.shape[1] != group * d:
        raise ValueError(f"weight must be [out_dim, {group * d}] for group {group} x D {d}, got {list(weight.shape)}")
    return b, n // group, d, side


def _common_args(feats, n_groups, d, side, drop_cls):
    return (n_groups, d, side, feats.stride(0), feats.stride(1), feats.stride(2))


class GroupedProjectionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, weight, bias, out, row_index, group, layout, drop_cls):
        b, n_groups, d, side = _geometry(feats, weight, group, layout, drop_cls)
        rows, n_out, k = b * n_groups, weight.shape[0], weight.shape[1]
        weight_c = weight.to(feats.dtype)
        bias_c = bias.to(feats.dtype) if bias is not None else None
        if out is None:
            target = torch.empty(rows, n_out, device=feats.device, dtype=feats.dtype)
        else:
            if out.dim() != 2 or out.shape[1] != n_out:
                raise ValueError(f"out must be [rows, {n_out}], got {list(out.shape)}")
            if row_index is None or row_index.numel() != rows:
                raise ValueError(f"row_index must hold {rows} row numbers of out (one per projected token)")
            target = out
        spatial = layout == "spatial"
        grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(n_out, BLOCK_N))
        _forward_kernel[grid](
            feats, weight_c, bias_c if bias_c is not None else weight_c, target,
            row_index if out is not None else weight_c, rows, n_out, k,
            *_common_args(feats, n_groups, d, side, drop_cls), weight_c.stride(0), weight_c.stride(1),
            target.stride(0), 1 if drop_cls else 0,
            GROUP=group, SPATIAL=spatial, HAS_BIAS=bias is not None, HAS_INDEX=out is not None,
            IEEE=feats.dtype == torch.float32, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
        )
        ctx.save_for_backward(feats, weight_c, row_index if out is not None else None)
        ctx.meta = (group, spatial, drop_cls, b, n_groups, d, side, bias is not None, weight.dtype,
                    None if bias is None else bias.dtype, out is not None)
        if out is not None:
            ctx.mark_dirty(out)
            return out
        return target.view(b, n_groups, n_out)

    @staticmethod
    def backward(ctx, grad):
        feats, weight_c, row_index = ctx.saved_tensors
        group, spatial, drop_cls, b, n_groups, d, side, has_bias, w_dtype, b_dtype, placed = ctx.meta
        rows, n_out, k = b * n_groups, weight_c.shape[0], weight_c.shape[1]
        grad_out = None
        if placed:
            dy = grad.index_select(0, row_index).contiguous()
            if ctx.needs_input_grad[3]:
                grad_out = grad.clone()
                grad_out[row_index] = 0  # those rows were overwritten by the projection
        else:
            dy = grad.reshape(rows, n_out).contiguous()
        ieee = feats.dtype == torch.float32
        args = _common_args(feats, n_groups, d, side, drop_cls)
        d_weight = d_bias = d_feats = None
        if ctx.needs_input_grad[1]:
            dw = torch.empty(n_out, k, device=feats.device, dtype=torch.float32)
            _grad_weight_kernel[(triton.cdiv(n_out, BLOCK_N), triton.cdiv(k, BLOCK_K))](
                feats, dy, dw, rows, n_out, k, *args, dy.stride(0), 1 if drop_cls else 0,
                GROUP=group, SPATIAL=spatial, IEEE=ieee, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
            )
            d_weight = dw.to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            d_bias = dy.sum(0, dtype=torch.float32).to(b_dtype)
        if ctx.needs_input_grad[0]:
            d_feats = torch.zeros_like(feats)  # the dropped CLS token gets zero
            _grad_feats_kernel[(triton.cdiv(rows, BLOCK_M), triton.cdiv(k, BLOCK_K))](
                dy, weight_c, d_feats, rows, n_out, k, n_groups, d, side,
                d_feats.stride(0), d_feats.stride(1), d_feats.stride(2), dy.stride(0),
                weight_c.stride(0), weight_c.stride(1), 1 if drop_cls else 0,
                GROUP=group, SPATIAL=spatial, IEEE=ieee, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
            )
        return d_feats, d_weight, d_bias, grad_out, None, None, None, None


def grouped_projection(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: int = 4,
    layout: str = "sequence",
    drop_cls: bool = True,
    out: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[B, (1+)N, D]` -> `[B, N/group, out_dim]`, or `out` with the projected rows placed."""
    if out is not None and row_index is None:
        raise ValueError("out= needs row_index= (the rows of out that receive the image tokens)")
    return GroupedProjectionFunction.apply(feats, weight, bias, out, row_index, group, layout, drop_cls)


__all__ = ["grouped_projection", "grouped_projection_reference"]
