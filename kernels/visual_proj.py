"""Grouped visual-token projection (MiniGPT-v2's connector) as one Triton GEMM.

`grouped_projection(feats, weight, bias, group=4, layout="sequence", drop_cls=True, out=None,
row_index=None)` computes `Linear(group*D -> out_dim)` over groups of `group` visual tokens of
`feats [B, 1+N, D]` (`[B, N, D]` with `drop_cls=False`; the CLS token is row 0):

- "sequence" (MiniGPT-v2): drop CLS, then `view(B, N/group, group*D)`, i.e. output token t
  concatenates patches 4t, 4t+1, 4t+2, 4t+3 in raster order.
- "spatial" (pixel-shuffle as in InternVL / Idefics3, group 4 on an even sqrt(N) x sqrt(N)
  grid): output token (i, j), numbered i * sqrt(N)/2 + j, concatenates the channels of patches
  (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) in that order. This is the channel order of
  transformers' `Idefics3Connector.pixel_shuffle(x, scale_factor=2)`: its output channel
  `(2*dr + dc) * D + c` is patch (2i+dr, 2j+dc), channel c. The tests check it against that code.

Kernels
  The grouping is address arithmetic inside the A-tile loads (output row + K index -> batch,
  token, channel): the features are never copied, reshaped or cast. The K loop runs token by
  token (`group` slices of D channels), so every A-tile is a contiguous run of one token's
  channels and the loads stay vectorised; each slice's tail is masked. fp32 accumulators, grouped
  tile ordering (GROUP_M row blocks sweep the columns together so the weight stays in L2).
  The weight and bias are read in their own dtype (fp32 master weights with bf16 activations
  need no cast copy) and cast per tile to the activations' dtype for the dot.

Placement
  With `out [rows, out_dim]` (e.g. the LLM's input embeddings flattened to `[B*T, H]`) and
  `row_index [B * N/group]`, projected token r is stored in row `row_index[r]` of `out`, in place,
  and `out` is returned: text and image embeddings are never concatenated. Rows outside
  `[0, rows)` are never written (the kernel masks them; CPU indices raise). Indices must be
  distinct, as `image_token_mask.nonzero()` gives them.

Backward
  dW `[out_dim, group*D]` (stored in the weight's dtype) and dbias come from one kernel that
  gathers A the same way; d_feats (only when `feats` requires grad, e.g. LoRA inside the ViT)
  scatters `dY W` back through the same index arithmetic, and the dropped CLS token gets zero.
  With placement, dY is read from `out`'s gradient at `row_index` inside the kernels, and the
  gradient passed on to `out`'s previous value is zero at those rows (they were overwritten).

torch.compile
  `pefomed::grouped_projection` is a functional custom op with `register_fake` and
  `register_autograd`; placement is the in-place op `pefomed::grouped_projection_place_` inside
  `GroupedPlacementFunction` (custom ops that mutate cannot carry `register_autograd`); both
  backward passes are `pefomed::grouped_projection_backward`. `torch.compile(fullgraph=True)`
  traces either path without a graph break.

The plain PyTorch version is `kernels.reference.grouped_projection_reference`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from pefomed.kernels.common import dot_acc
from pefomed.kernels.reference import grouped_projection_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WHERE = "kernels.visual_proj.grouped_projection"
LAYOUTS = ("sequence", "spatial")


# --- Triton ----------------------------------------------------------------------------------


@triton.jit
def _tile_coords(pid, n_row_tiles, n_col_tiles, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share each column tile, so it stays in L2."""
    per_group = GROUP_M * n_col_tiles
    first = (pid // per_group) * GROUP_M
    size = min(n_row_tiles - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _token_base(rows, g, n_groups, side, stride_b, stride_t, cls_offset,
                GROUP: tl.constexpr, SPATIAL: tl.constexpr):  # fmt: skip
    """Offset in feats of channel 0 of the `g`-th token concatenated into output rows `rows`."""
    b = rows // n_groups
    t = rows % n_groups
    if SPATIAL:
        half = side // 2
        token = (2 * (t // half) + g // 2) * side + 2 * (t % half) + g % 2
    else:
        token = t * GROUP + g
    return b.to(tl.int64) * stride_b + (token + cls_offset).to(tl.int64) * stride_t


@triton.jit
def _forward_kernel(
    feats, weight, bias, out, row_index,
    R, N, D, n_groups, side, cls_offset, out_rows,
    stride_b, stride_t, stride_d, stride_wn, stride_wk, stride_om, stride_on,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr, PLACED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[dest(r), n] = sum_k A[r, k] W[n, k] + bias[n], A gathered from feats in the loads."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in tl.static_range(GROUP):
        base = _token_base(rows, g, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL)
        for c0 in range(0, D, BLOCK_K):
            cs = c0 + tl.arange(0, BLOCK_K)
            c_ok = cs < D
            a = tl.load(feats + base[:, None] + cs[None, :] * stride_d, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(weight + cols.to(tl.int64)[None, :] * stride_wn + (g * D + cs)[:, None] * stride_wk,
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot_acc(acc, a, w.to(a.dtype), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if PLACED:
        dest = tl.load(row_index + rows, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (dest >= 0) & (dest < out_rows)
    else:
        dest = rows.to(tl.int64)
    tl.store(out + dest[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_weight_kernel(
    feats, dy, row_index, dw, dbias,
    R, N, D, n_groups, side, cls_offset,
    stride_b, stride_t, stride_d, stride_dym, stride_dyn,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, PLACED: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dW[n, g*D + c] = sum_r dY[r, n] A[r, g*D + c]; the first K tile column also sums dbias."""
    k_tiles_per_token = tl.cdiv(D, BLOCK_K)
    pid_n, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), GROUP * k_tiles_per_token, GROUP_M)
    g = pid_k // k_tiles_per_token
    cs = (pid_k % k_tiles_per_token) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cs < D
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, R, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        base = _token_base(rows, g, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL)
        a = tl.load(feats + base[:, None] + cs[None, :] * stride_d, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        if PLACED:
            src = tl.load(row_index + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        grad = tl.load(dy + src[:, None] * stride_dym + cols[None, :] * stride_dyn,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_BIAS:
            bias_acc += tl.sum(grad.to(tl.float32), axis=0)
        acc = dot_acc(acc, tl.trans(grad.to(a.dtype)), a, IEEE)
    k_index = g * D + cs
    tl.store(dw + cols.to(tl.int64)[:, None] * (GROUP * D) + k_index[None, :], acc.to(dw.dtype.element_ty),
             mask=col_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if pid_k == 0:
            tl.store(dbias + cols, bias_acc, mask=col_ok)


@triton.jit
def _grad_feats_kernel(
    dy, weight, row_index, dfeats,
    R, N, D, n_groups, side, cls_offset,
    stride_b, stride_t, stride_d, stride_dym, stride_dyn, stride_wn, stride_wk,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, PLACED: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dA = dY W, stored at the feature positions each A element was gathered from."""
    k_tiles_per_token = tl.cdiv(D, BLOCK_K)
    pid_m, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(R, BLOCK_M), GROUP * k_tiles_per_token, GROUP_M)
    g = pid_k // k_tiles_per_token
    cs = (pid_k % k_tiles_per_token) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    c_ok = cs < D
    if PLACED:
        src = tl.load(row_index + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        grad = tl.load(dy + src[:, None] * stride_dym + cols[None, :] * stride_dyn,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        w = tl.load(weight + cols.to(tl.int64)[:, None] * stride_wn + (g * D + cs)[None, :] * stride_wk,
                    mask=col_ok[:, None] & c_ok[None, :], other=0.0)
        acc = dot_acc(acc, grad.to(dfeats.dtype.element_ty), w.to(dfeats.dtype.element_ty), IEEE)
    base = _token_base(rows, g, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL)
    tl.store(dfeats + base[:, None] + cs[None, :] * stride_d, acc.to(dfeats.dtype.element_ty),
             mask=row_ok[:, None] & c_ok[None, :])


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the interpreter crashes on >1 config; 16-wide tiles keep it fast and masked
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    # EVA-g -> LLaMA: M = B*256 (256 .. 4096), N = 4096, K slices of D = 1408 = 22 * 64.
    shapes = [
        (128, 128, 64, 3, 8),
        (128, 256, 64, 3, 8),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


# Every kernel only stores (no accumulation into its output), so autotuning re-runs are harmless.
_forward_tuned = triton.autotune(configs=_configs(), key=["R", "N", "D"])(_forward_kernel)
_grad_weight_tuned = triton.autotune(configs=_configs(), key=["R", "N", "D"])(_grad_weight_kernel)
_grad_feats_tuned = triton.autotune(configs=_configs(), key=["R", "N", "D"])(_grad_feats_kernel)


# --- launchers -------------------------------------------------------------------------------


class Geometry(NamedTuple):
    """How `feats [B, tokens, D]` maps to the `rows = B * n_groups` rows of the GEMM."""

    batch: int
    n_groups: int
    dim: int
    side: int  # patch-grid side for "spatial" (0 for "sequence")
    cls_offset: int  # 1 when the CLS token at index 0 is skipped

    @property
    def rows(self) -> int:
        return self.batch * self.n_groups


def geometry(feats: torch.Tensor, weight: torch.Tensor, group: int, layout: str, drop_cls: bool) -> Geometry:
    """Checks the shapes and returns the row geometry, with errors that say what to change."""
    if feats.dim() != 3:
        raise ValueError(f"{_WHERE}: feats must be [B, tokens, D], got shape {list(feats.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"{_WHERE}: layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"{_WHERE}: group must be a positive int, got {group!r}")
    batch, tokens, dim = feats.shape
    n = tokens - (1 if drop_cls else 0)
    if n <= 0 or n % group:
        raise ValueError(
            f"{_WHERE}: {n} visual tokens ({tokens} with drop_cls={drop_cls}) cannot be grouped by {group}; "
            "check the image size / patch size, model.group and whether the encoder emits a CLS token"
        )
    side = 0
    if layout == "spatial":
        side = round(n**0.5)
        if group != 4 or side * side != n or side % 2:
            raise ValueError(
                f"{_WHERE}: the spatial layout needs group 4 and an even square patch grid, got group {group} "
                f"and {n} tokens; use layout='sequence' or an image size giving an even grid"
            )
    if weight.dim() != 2 or weight.shape[1] != group * dim:
        raise ValueError(
            f"{_WHERE}: weight must be [out_dim, group*D] = [out_dim, {group * dim}] for group {group} and "
            f"D {dim}, got {list(weight.shape)}"
        )
    return Geometry(batch, n // group, dim, side, 1 if drop_cls else 0)


def _check_tensors(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("feats", feats), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{_WHERE}: {name} has dtype {t.dtype}; the Triton path takes float16, bfloat16 or float32")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{_WHERE}: bias has shape {list(bias.shape)}, expected [{weight.shape[0]}] (weight's out_dim)")
    devices = {str(t.device) for t in (feats, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{_WHERE}: feats, weight and bias are on different devices {sorted(devices)}")
    if feats.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"{_WHERE}: the Triton path runs on CUDA tensors, got {feats.device}; use `kernels: torch` "
            "(kernels.reference.grouped_projection_reference) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _check_placement(out: torch.Tensor, row_index: torch.Tensor, rows: int, out_dim: int, device: torch.device) -> None:
    if out.dim() != 2 or out.shape[1] != out_dim:
        raise ValueError(
            f"{_WHERE}: out must be [rows, {out_dim}] (e.g. the input embeddings flattened to [B*T, hidden]), "
            f"got {list(out.shape)}"
        )
    if out.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{_WHERE}: out has dtype {out.dtype}; expected float16, bfloat16 or float32")
    if row_index.dtype not in (torch.int32, torch.int64) or row_index.dim() != 1 or row_index.numel() != rows:
        raise ValueError(
            f"{_WHERE}: row_index must be a 1-D int64/int32 tensor of {rows} row numbers of out (one per projected "
            f"token, batch-major), got {row_index.dtype} {list(row_index.shape)}"
        )
    if out.device != device or row_index.device != device:
        raise ValueError(f"{_WHERE}: out ({out.device}) and row_index ({row_index.device}) must be on {device}")
    # On CPU the check is free; on GPU (or in a compiled graph) it would cost a sync per call,
    # and the kernel masks out-of-range rows instead.
    checkable = row_index.device.type == "cpu" and rows and not torch.compiler.is_compiling()
    if checkable and (int(row_index.min()) < 0 or int(row_index.max()) >= out.shape[0]):
        raise ValueError(f"{_WHERE}: row_index has entries outside [0, {out.shape[0]}), the rows of out")


def _precision_is_ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs use exact products unless TF32 is allowed, as torch.matmul does."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _feature_strides(feats: torch.Tensor) -> tuple[int, int, int]:
    return feats.stride(0), feats.stride(1), feats.stride(2)


def projection_forward(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    layout: str,
    drop_cls: bool,
    out: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launches the forward kernel: a new `[B, N/group, out_dim]`, or `out` with rows placed."""
    geo = geometry(feats, weight, group, layout, drop_cls)
    n_out = weight.shape[0]
    placed = out is not None
    target = out if placed else torch.empty(geo.rows, n_out, device=feats.device, dtype=feats.dtype)
    index = row_index if placed else target  # a dummy pointer when not placing

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(geo.rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _forward_tuned[grid](
        feats, weight, bias if bias is not None else weight, target, index,
        geo.rows, n_out, geo.dim, geo.n_groups, geo.side, geo.cls_offset, target.shape[0],
        *_feature_strides(feats), weight.stride(0), weight.stride(1), target.stride(0), target.stride(1),
        GROUP=group, SPATIAL=layout == "spatial", HAS_BIAS=bias is not None, PLACED=placed,
        IEEE=_precision_is_ieee(feats.dtype),
    )  # fmt: skip
    return target if placed else target.view(geo.batch, geo.n_groups, n_out)


def projection_backward(
    dy: torch.Tensor,
    feats: torch.Tensor,
    weight: torch.Tensor,
    row_index: torch.Tensor | None,
    group: int,
    layout: str,
    drop_cls: bool,
    need_feats: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_feats, d_weight, d_bias in fp32); empty tensors stand for the ones not needed.

    `dy` is `[B, N/group, out_dim]`, or with `row_index` the gradient of the whole `out`.
    """
    geo = geometry(feats, weight, group, layout, drop_cls)
    n_out = weight.shape[0]
    placed = row_index is not None
    dy2 = dy if placed else dy.reshape(geo.rows, n_out)
    index = row_index if placed else dy2
    common = {"GROUP": group, "SPATIAL": layout == "spatial", "PLACED": placed, "IEEE": _precision_is_ieee(feats.dtype)}
    d_feats = feats.new_empty(0)
    d_weight = weight.new_empty(0)
    d_bias = weight.new_empty(0, dtype=torch.float32)
    if need_weight or need_bias:
        d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
        d_bias = torch.empty(n_out, device=weight.device, dtype=torch.float32) if need_bias else d_bias

        def grid_w(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(n_out, meta["BLOCK_N"]) * group * triton.cdiv(geo.dim, meta["BLOCK_K"]),)

        _grad_weight_tuned[grid_w](
            feats, dy2, index, d_weight, d_bias if need_bias else d_weight,
            geo.rows, n_out, geo.dim, geo.n_groups, geo.side, geo.cls_offset,
            *_feature_strides(feats), dy2.stride(0), dy2.stride(1),
            HAS_BIAS=need_bias, **common,
        )  # fmt: skip
        d_weight = d_weight if need_weight else weight.new_empty(0)
    if need_feats:
        d_feats = torch.empty_like(feats, memory_format=torch.contiguous_format)
        if drop_cls:
            d_feats[:, 0].zero_()  # every other position is written exactly once by the kernel

        def grid_f(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(geo.rows, meta["BLOCK_M"]) * group * triton.cdiv(geo.dim, meta["BLOCK_K"]),)

        _grad_feats_tuned[grid_f](
            dy2, weight, index, d_feats,
            geo.rows, n_out, geo.dim, geo.n_groups, geo.side, geo.cls_offset,
            *_feature_strides(d_feats), dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1),
            **common,
        )  # fmt: skip
    return d_feats, d_weight, d_bias


# --- torch.library ops -----------------------------------------------------------------------


@torch.library.custom_op("pefomed::grouped_projection", mutates_args=())
def _projection_op(
    feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int, layout: str, drop_cls: bool
) -> torch.Tensor:
    return projection_forward(feats, weight, bias, group, layout, drop_cls)


@_projection_op.register_fake
def _(feats, weight, bias, group, layout, drop_cls):
    geo = geometry(feats, weight, group, layout, drop_cls)
    return feats.new_empty((geo.batch, geo.n_groups, weight.shape[0]))


@torch.library.custom_op("pefomed::grouped_projection_place_", mutates_args=("out",))
def _place_op(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    row_index: torch.Tensor,
    group: int,
    layout: str,
    drop_cls: bool,
) -> None:
    projection_forward(feats, weight, bias, group, layout, drop_cls, out, row_index)


@_place_op.register_fake
def _(feats, weight, bias, out, row_index, group, layout, drop_cls):
    return None


@torch.library.custom_op("pefomed::grouped_projection_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor,
    feats: torch.Tensor,
    weight: torch.Tensor,
    row_index: torch.Tensor | None,
    group: int,
    layout: str,
    drop_cls: bool,
    need_feats: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return projection_backward(dy, feats, weight, row_index, group, layout, drop_cls, need_feats, need_weight, need_bias)


@_backward_op.register_fake
def _(dy, feats, weight, row_index, group, layout, drop_cls, need_feats, need_weight, need_bias):
    d_feats = torch.empty_like(feats, memory_format=torch.contiguous_format) if need_feats else feats.new_empty(0)
    d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0)
    d_bias = weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=torch.float32)
    return d_feats, d_weight, d_bias


def _parameter_grads(ctx: Any, d_feats, d_weight, d_bias, feats_i: int, weight_i: int, bias_i: int) -> tuple:
    """The grads the autograd engine asked for, None for the rest, bias cast back to its dtype."""
    needs = ctx.needs_input_grad
    return (
        d_feats if needs[feats_i] else None,
        d_weight if needs[weight_i] else None,
        d_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[bias_i] else None,
    )


def _setup_projection(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    feats, weight, bias, group, layout, drop_cls = inputs
    ctx.save_for_backward(feats, weight)
    ctx.options = (group, layout, drop_cls)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _projection_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    feats, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    d_feats, d_weight, d_bias = torch.ops.pefomed.grouped_projection_backward(
        grad, feats, weight, None, *ctx.options, needs[0], needs[1], ctx.bias_dtype is not None and needs[2]
    )
    return (*_parameter_grads(ctx, d_feats, d_weight, d_bias, 0, 1, 2), None, None, None)


_projection_op.register_autograd(_projection_backward, setup_context=_setup_projection)


class GroupedPlacementFunction(torch.autograd.Function):
    """Projection written in place into `out`'s rows; gradients to feats, weight, bias and out."""

    @staticmethod
    def forward(ctx, feats, weight, bias, out, row_index, group, layout, drop_cls):
        torch.ops.pefomed.grouped_projection_place_(feats, weight, bias, out, row_index, group, layout, drop_cls)
        ctx.mark_dirty(out)
        ctx.save_for_backward(feats, weight, row_index)
        ctx.options = (group, layout, drop_cls)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad):
        feats, weight, row_index = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_feats, d_weight, d_bias = torch.ops.pefomed.grouped_projection_backward(
            grad, feats, weight, row_index, *ctx.options, needs[0], needs[1], ctx.bias_dtype is not None and needs[2]
        )
        # The placed rows replaced out's previous values, which therefore get no gradient there.
        d_out = grad.index_fill(0, row_index, 0) if needs[3] else None
        return (*_parameter_grads(ctx, d_feats, d_weight, d_bias, 0, 1, 2), d_out, None, None, None, None)


# --- public API ------------------------------------------------------------------------------


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
    """`[B, (1+)N, D]` -> `[B, N/group, out_dim]`; with `out` + `row_index`, `out` with the rows placed.

    `out [rows, out_dim]` is written in place (row `row_index[b * N/group + t]` receives token t of
    image b) and returned; gradients flow from those rows of `out` to feats, weight and bias.
    """
    if (out is None) != (row_index is None):
        raise ValueError(f"{_WHERE}: out= and row_index= go together (row_index: the rows of out that receive the image tokens)")
    _check_tensors(feats, weight, bias)
    geo = geometry(feats, weight, group, layout, drop_cls)
    if out is None:
        return torch.ops.pefomed.grouped_projection(feats, weight, bias, group, layout, drop_cls)
    _check_placement(out, row_index, geo.rows, weight.shape[0], feats.device)
    return GroupedPlacementFunction.apply(feats, weight, bias, out, row_index, group, layout, drop_cls)


__all__ = ["LAYOUTS", "GroupedPlacementFunction", "grouped_projection", "grouped_projection_reference"]
