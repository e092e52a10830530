"""Grouped visual-token projection (MiniGPT-v2's connector) as Triton GEMMs.

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
  The grouping is address arithmetic: the offset of element (row r, k = g*D + c) of the grouped
  matrix is `row_offset(r) + slot_offset(g) + c * stride_d`, separable for both layouts, so the
  K loop of every GEMM is one flat loop over (token slot g, channel chunk) pairs (one software
  pipeline, no drain between tokens) whose A tiles are contiguous runs of one token's channels
  (128-bit loads). The features are never copied, reshaped or cast.
  - forward: `out[dest(r)] = A W^T + b`, autotuned tiles in grouped (swizzled) order so a band
    of row tiles shares each weight tile in L2;
  - dW = dY^T A: a plain GEMM over the rows (output [out_dim, group*D] in the weight's dtype,
    fp32 accumulation, each dY tile read once per output column tile) whose first column of
    tiles also sums dbias;
  - d_feats = dY W, scattered back through the same offsets (only when feats requires grad, e.g.
    LoRA inside the ViT); the dropped CLS token gets zero.
  Every dot takes two operands of the activations' dtype (bf16 MMA for bf16) and accumulates in
  fp32. The weight (fp32 master weights with bf16 activations) is cast to the activations' dtype
  once per step, in the forward; the backward reuses that cast for d_feats, and dW comes back in
  the weight's own dtype. The bias is added in fp32 as it is.

Placement
  With `out [rows, out_dim]` (e.g. the LLM's input embeddings flattened to `[B*T, H]`) and
  `row_index [B * N/group]`, projected token r is stored in row `row_index[r]` of `out`, in place,
  and `out` is returned: text and image embeddings are never concatenated. Rows outside
  `[0, rows)` are never written (the kernel masks them; CPU indices raise). Indices must be
  distinct, as `image_token_mask.nonzero()` gives them. Every tensor (feats, weight, bias, out,
  row_index, the gradients) is read and written through its strides.
  In the backward, dY is read from `out`'s gradient at `row_index` inside the kernels, and the
  gradient passed on to `out`'s previous value is zero at those rows (they were overwritten).

Why not cuBLAS on a view: with the CLS token dropped, `feats[:, 1:].view(B, N/4, 4D)` is not a
2-D matrix for B > 1 (the batch stride is (N+1)*D, not N*D), so cuBLAS would need a copy of the
features, and placement a scatter of the output; each is an extra pass over as many bytes as the
GEMM's own output, which the Triton GEMM folds into its loads and stores.

torch.compile
  `pefomed::grouped_projection` (functional, with `register_autograd`),
  `pefomed::grouped_projection_place_` (mutates `out`) and `pefomed::grouped_projection_backward`
  are custom ops with fake implementations that give the real (contiguous) strides; the public
  function goes through `ProjectionFunction` / `GroupedPlacementFunction` (which cast the weight
  once per step). `torch.compile(fullgraph=True)` traces either path without a graph break.

The plain PyTorch version is `kernels.reference.grouped_projection_reference`.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from pefomed.kernels.common import prune_for_device
from pefomed.kernels.reference import grouped_projection_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WHERE = "kernels.visual_proj.grouped_projection"
LAYOUTS = ("sequence", "spatial")


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher fills comes from here (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --- Triton ----------------------------------------------------------------------------------


@triton.jit
def _tile_coords(pid, n_row_tiles, n_col_tiles, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share each column tile, so it stays in L2."""
    per_group = GROUP_M * n_col_tiles
    first = (pid // per_group) * GROUP_M
    size = min(n_row_tiles - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _row_offsets(rows, n_groups, side, stride_b, stride_t, cls_offset, GROUP: tl.constexpr, SPATIAL: tl.constexpr):
    """Offset in feats of channel 0 of the first token concatenated into each output row."""
    b = rows // n_groups
    t = rows % n_groups
    if SPATIAL:
        half = side // 2
        token = (2 * (t // half)).to(tl.int64) * side + 2 * (t % half)
    else:
        token = t.to(tl.int64) * GROUP
    return b.to(tl.int64) * stride_b + (token + cls_offset) * stride_t


@triton.jit
def _slot_offset(g, side, stride_t, SPATIAL: tl.constexpr):
    """Offset of the g-th concatenated token from the first (0, 1, side, side+1 for spatial)."""
    if SPATIAL:
        rel = (g // 2).to(tl.int64) * side + g % 2
    else:
        rel = g.to(tl.int64)
    return rel * stride_t


@triton.jit
def _source_rows(row_index, rows, ok, stride_ri, PLACED: tl.constexpr):
    """The rows of dY (out's gradient) that projected rows `rows` were placed in."""
    if PLACED:
        return tl.load(row_index + rows.to(tl.int64) * stride_ri, mask=ok, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _forward_kernel(
    feats, weight, bias, out, row_index,
    R, N, D, n_groups, side, cls_offset, out_rows,
    stride_b, stride_t, stride_d, stride_wn, stride_wk, stride_bias, stride_om, stride_on, stride_ri,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, HAS_BIAS: tl.constexpr, PLACED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[dest(r), n] = sum_k A[r, k] W[n, k] + bias[n], A gathered from feats in the loads."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < N
    rk = tl.arange(0, BLOCK_K)
    a_rows = feats + _row_offsets(rows, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL)[:, None]
    w_cols = weight + cols.to(tl.int64)[None, :] * stride_wn
    chunks = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, GROUP * chunks):
        g = i // chunks
        cs = (i % chunks) * BLOCK_K + rk
        c_ok = cs < D
        a = tl.load(
            a_rows + _slot_offset(g, side, stride_t, SPATIAL) + cs.to(tl.int64)[None, :] * stride_d,
            mask=row_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_cols + (g.to(tl.int64) * D + cs)[:, None] * stride_wk, mask=c_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + cols.to(tl.int64) * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if PLACED:
        dest = tl.load(row_index + rows.to(tl.int64) * stride_ri, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (dest >= 0) & (dest < out_rows)
    else:
        dest = rows.to(tl.int64)
    tl.store(
        out + dest[:, None] * stride_om + cols.to(tl.int64)[None, :] * stride_on,
        acc.to(out.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _grad_weight_kernel(
    feats, dy, row_index, dw, dbias,
    R, N, D, n_groups, side, cls_offset,
    stride_b, stride_t, stride_d, stride_dym, stride_dyn, stride_ri, stride_dwn, stride_dwk, stride_dbias,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, PLACED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dW[n, g*D + c] = sum_r dY[src(r), n] A[r, g*D + c]: a GEMM whose reduction runs over the
    rows (BLOCK_M over out_dim, BLOCK_N over one token's channels, BLOCK_K over rows); after it,
    the programs of the first column tile sum dbias[n] = sum_r dY[src(r), n] in a second loop, so
    the GEMM's loop stays a plain pipelined one."""
    chunks = tl.cdiv(D, BLOCK_N)
    pid_m, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_M), GROUP * chunks, GROUP_M)
    g = pid_k // chunks
    cs = (pid_k % chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cs < D
    o_ok = outs < N
    slot = _slot_offset(g, side, stride_t, SPATIAL)
    dy_cols = dy + outs.to(tl.int64)[:, None] * stride_dyn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    src = _source_rows(row_index, tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_K) < R, stride_ri, PLACED)
    for r0 in range(0, R, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < R
        base = _row_offsets(rows, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL) + slot
        a = tl.load(
            feats + base[:, None] + cs.to(tl.int64)[None, :] * stride_d, mask=r_ok[:, None] & c_ok[None, :], other=0.0
        )
        grad = tl.load(dy_cols + src[None, :] * stride_dym, mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        src = _source_rows(row_index, rows + BLOCK_K, rows + BLOCK_K < R, stride_ri, PLACED)
        acc = tl.dot(grad.to(a.dtype), a, acc, input_precision=PRECISION)
    k_index = g.to(tl.int64) * D + cs
    tl.store(
        dw + outs.to(tl.int64)[:, None] * stride_dwn + k_index[None, :] * stride_dwk,
        acc.to(dw.dtype.element_ty),
        mask=o_ok[:, None] & c_ok[None, :],
    )
    if HAS_BIAS:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if pid_k == 0:
            bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_K):
                rows = r0 + tl.arange(0, BLOCK_K)
                r_ok = rows < R
                src = _source_rows(row_index, rows, r_ok, stride_ri, PLACED)
                grad = tl.load(dy_cols + src[None, :] * stride_dym, mask=o_ok[:, None] & r_ok[None, :], other=0.0)
                bias_acc += tl.sum(grad.to(tl.float32), axis=1)
            tl.store(dbias + outs.to(tl.int64) * stride_dbias, bias_acc, mask=o_ok)


@triton.jit
def _grad_feats_kernel(
    dy, weight, row_index, dfeats,
    R, N, D, n_groups, side, cls_offset,
    stride_b, stride_t, stride_d, stride_dym, stride_dyn, stride_wn, stride_wk, stride_ri,
    GROUP: tl.constexpr, SPATIAL: tl.constexpr, PLACED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dA = dY W, stored at the feature positions each A element was gathered from (the strides
    are d_feats')."""
    chunks = tl.cdiv(D, BLOCK_N)
    pid_m, pid_k = _tile_coords(tl.program_id(0), tl.cdiv(R, BLOCK_M), GROUP * chunks, GROUP_M)
    g = pid_k // chunks
    cs = (pid_k % chunks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    c_ok = cs < D
    src = _source_rows(row_index, rows, row_ok, stride_ri, PLACED)
    dy_rows = dy + src[:, None] * stride_dym
    w_cols = weight + (g.to(tl.int64) * D + cs)[None, :] * stride_wk
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + rk
        n_ok = ns < N
        grad = tl.load(dy_rows + ns.to(tl.int64)[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_cols + ns.to(tl.int64)[:, None] * stride_wn, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(grad.to(w.dtype), w, acc, input_precision=PRECISION)
    base = _row_offsets(rows, n_groups, side, stride_b, stride_t, cls_offset, GROUP, SPATIAL) + _slot_offset(
        g, side, stride_t, SPATIAL
    )
    tl.store(
        dfeats + base[:, None] + cs.to(tl.int64)[None, :] * stride_d,
        acc.to(dfeats.dtype.element_ty),
        mask=row_ok[:, None] & c_ok[None, :],
    )


# --- configurations --------------------------------------------------------------------------
# EVA-g -> LLaMA: rows = B*256 (256 .. 4096), out_dim 4096, D = 1408 = 11 * 128 = 22 * 64 channels
# per token. The compile gate (`python -m pefomed.bench.static --only visual_proj`, STATIC_CASES
# below) compiles every config for sm_80 / sm_86 / sm_90a; one that fails an arch is listed in that
# arch's EXCLUDE entry and pruned there at run time.


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
    )


GEMM_CONFIGS = [
    _config(*c)
    for c in ((128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
              (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4))
]  # fmt: skip
FORWARD_EXCLUDE: dict[int, set[str]] = {}
# From `python -m pefomed.bench.static --only visual_proj`: these spill there (mma.sync keeps the
# transposed dY operand in registers).
GRAD_WEIGHT_EXCLUDE: dict[int, set[str]] = {
    80: {"BLOCK_K=64,BLOCK_M=128,BLOCK_N=256,GROUP_M=8,w8,s3", "BLOCK_K=64,BLOCK_M=128,BLOCK_N=128,GROUP_M=8,w4,s4"},
    86: {"BLOCK_K=64,BLOCK_M=128,BLOCK_N=256,GROUP_M=8,w8,s3", "BLOCK_K=64,BLOCK_M=128,BLOCK_N=128,GROUP_M=8,w4,s4",
         "BLOCK_K=32,BLOCK_M=128,BLOCK_N=128,GROUP_M=8,w4,s4"},
}  # fmt: skip
GRAD_FEATS_EXCLUDE: dict[int, set[str]] = {}
# The interpreter crashes on autotuning with more than one config; 16-wide tiles keep it fast and masked.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})


def _autotuned(kernel: Any, exclude: dict[int, set[str]]) -> Any:
    # Every kernel only stores (no accumulation into its output), so autotuning re-runs are harmless.
    if _INTERPRET:
        return triton.autotune(configs=[_INTERPRETER_CONFIG], key=["R", "N", "D"])(kernel)
    return triton.autotune(
        configs=GEMM_CONFIGS, key=["R", "N", "D"], prune_configs_by={"early_config_prune": prune_for_device(exclude)}
    )(kernel)


_forward_tuned = _autotuned(_forward_kernel, FORWARD_EXCLUDE)
_grad_weight_tuned = _autotuned(_grad_weight_kernel, GRAD_WEIGHT_EXCLUDE)
_grad_feats_tuned = _autotuned(_grad_feats_kernel, GRAD_FEATS_EXCLUDE)


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
        side = _isqrt(n)
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


def _isqrt(n: Any) -> int:
    # A symbolic token count (torch.compile with dynamic shapes) is specialized here: the spatial
    # grid side is a compile-time fact of the vision tower.
    n = int(n)
    side = int(n**0.5)
    while side * side > n:
        side -= 1
    while (side + 1) * (side + 1) <= n:
        side += 1
    return side


def _check_tensors(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("feats", feats), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{_WHERE}: {name} has dtype {t.dtype}; the Triton path takes float16, bfloat16 or float32")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{_WHERE}: bias has shape {list(bias.shape)}, expected [{weight.shape[0]}] (weight's out_dim)"
        )
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


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact products unless TF32 is allowed, as torch.matmul does."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _common(geo: Geometry, group: int, layout: str, dtype: torch.dtype) -> dict[str, Any]:
    return {"GROUP": group, "SPATIAL": layout == "spatial", "PRECISION": _precision(dtype)}


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
    """Launches the forward kernel: a new `[B, N/group, out_dim]`, or `out` with rows placed.

    `weight` should already have feats' dtype (the autograd functions cast it once per step);
    another dtype is cast here.
    """
    geo = geometry(feats, weight, group, layout, drop_cls)
    weight = _as(weight, feats.dtype)
    n_out = weight.shape[0]
    placed = out is not None
    target = out if placed else _new_output((geo.rows, n_out), feats.dtype, feats.device)
    index = row_index if placed else target  # a dummy pointer when not placing

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(geo.rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    if geo.rows and n_out:
        _forward_tuned[grid](
            feats, weight, bias if bias is not None else weight, target, index,
            geo.rows, n_out, geo.dim, geo.n_groups, geo.side, geo.cls_offset, target.shape[0],
            feats.stride(0), feats.stride(1), feats.stride(2), weight.stride(0), weight.stride(1),
            bias.stride(0) if bias is not None else 0, target.stride(0), target.stride(1),
            row_index.stride(0) if placed else 0,
            HAS_BIAS=bias is not None, PLACED=placed, **_common(geo, group, layout, feats.dtype),
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
    weight_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_feats, d_weight in `weight_dtype` (default weight's), d_bias in fp32); empty tensors stand
    for the ones not needed.

    `dy` is `[B, N/group, out_dim]`, or with `row_index` the gradient of the whole `out`. `weight`
    is only read for d_feats, cast to feats' dtype if it is not already.
    """
    geo = geometry(feats, weight, group, layout, drop_cls)
    n_out = weight.shape[0]
    placed = row_index is not None
    dy2 = dy if placed else dy.reshape(geo.rows, n_out)
    index = row_index if placed else dy2
    stride_ri = row_index.stride(0) if placed else 0
    common = {**_common(geo, group, layout, feats.dtype), "PLACED": placed}
    geo_args = (geo.rows, n_out, geo.dim, geo.n_groups, geo.side, geo.cls_offset)
    d_feats = feats.new_empty(0)
    d_weight = weight.new_empty(0, dtype=weight_dtype or weight.dtype)
    d_bias = weight.new_empty(0, dtype=torch.float32)
    if need_weight or need_bias:
        d_weight = _new_output(tuple(weight.shape), weight_dtype or weight.dtype, weight.device)
        if need_bias:
            d_bias = _new_output((n_out,), torch.float32, weight.device)

        def grid_w(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(n_out, meta["BLOCK_M"]) * group * triton.cdiv(geo.dim, meta["BLOCK_N"]),)

        if geo.rows == 0:
            d_weight.zero_()
            d_bias.zero_()
        else:
            _grad_weight_tuned[grid_w](
                feats, dy2, index, d_weight, d_bias if need_bias else d_weight,
                *geo_args,
                feats.stride(0), feats.stride(1), feats.stride(2), dy2.stride(0), dy2.stride(1), stride_ri,
                d_weight.stride(0), d_weight.stride(1), d_bias.stride(0) if need_bias else 0,
                HAS_BIAS=need_bias, **common,
            )  # fmt: skip
        if not need_weight:
            d_weight = weight.new_empty(0, dtype=weight_dtype or weight.dtype)
    if need_feats:
        w = _as(weight, feats.dtype)
        d_feats = _new_output(tuple(feats.shape), feats.dtype, feats.device)
        if drop_cls:
            d_feats[:, 0].zero_()  # every other position is written exactly once by the kernel

        def grid_f(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(geo.rows, meta["BLOCK_M"]) * group * triton.cdiv(geo.dim, meta["BLOCK_N"]),)

        if geo.rows:
            _grad_feats_tuned[grid_f](
                dy2, w, index, d_feats,
                *geo_args,
                d_feats.stride(0), d_feats.stride(1), d_feats.stride(2), dy2.stride(0), dy2.stride(1),
                w.stride(0), w.stride(1), stride_ri,
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
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return projection_backward(
        dy, feats, weight, row_index, group, layout, drop_cls, need_feats, need_weight, need_bias, weight_dtype
    )


@_backward_op.register_fake
def _(dy, feats, weight, row_index, group, layout, drop_cls, need_feats, need_weight, need_bias, weight_dtype):
    d_feats = feats.new_empty(feats.shape if need_feats else (0,))
    d_weight = weight.new_empty(weight.shape if need_weight else (0,), dtype=weight_dtype)
    d_bias = weight.new_empty((weight.shape[0],) if need_bias else (0,), dtype=torch.float32)
    return d_feats, d_weight, d_bias


def _parameter_grads(needs: tuple[bool, ...], bias_dtype: torch.dtype | None, d_feats, d_weight, d_bias) -> tuple:
    """The grads the autograd engine asked for (feats, weight, bias), None for the rest."""
    return (
        d_feats if needs[0] else None,
        d_weight if needs[1] else None,
        d_bias.to(bias_dtype) if bias_dtype is not None and needs[2] else None,
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
        grad,
        feats,
        weight,
        None,
        *ctx.options,
        needs[0],
        needs[1],
        ctx.bias_dtype is not None and needs[2],
        weight.dtype,
    )
    return (*_parameter_grads(needs, ctx.bias_dtype, d_feats, d_weight, d_bias), None, None, None)


# For callers of the op itself; the public function below goes through ProjectionFunction.
_projection_op.register_autograd(_projection_backward, setup_context=_setup_projection)


def _weight_for_backward(ctx: Any, weight: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
    """d_feats needs the cast weight; dW and dbias need only its shape, so the cast is kept only
    when feats (input 0) requires grad."""
    ctx.weight_dtype = weight.dtype
    return cast if ctx.needs_input_grad[0] else weight


class ProjectionFunction(torch.autograd.Function):
    """`[B, (1+)N, D]` -> `[B, N/group, out_dim]` with the weight cast to feats' dtype once."""

    @staticmethod
    def forward(ctx, feats, weight, bias, group, layout, drop_cls):
        w = _as(weight, feats.dtype)
        y = torch.ops.pefomed.grouped_projection(feats, w, bias, group, layout, drop_cls)
        ctx.save_for_backward(feats, _weight_for_backward(ctx, weight, w))
        ctx.options = (group, layout, drop_cls)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_feats, d_weight, d_bias = torch.ops.pefomed.grouped_projection_backward(
            grad,
            feats,
            weight,
            None,
            *ctx.options,
            needs[0],
            needs[1],
            ctx.bias_dtype is not None and needs[2],
            ctx.weight_dtype,
        )
        return (*_parameter_grads(needs, ctx.bias_dtype, d_feats, d_weight, d_bias), None, None, None)


class GroupedPlacementFunction(torch.autograd.Function):
    """Projection written in place into `out`'s rows; gradients to out, feats, weight and bias.

    `out` comes first: when it is a view, autograd routes the first input's gradient to the view's
    base (CopySlices), as for an in-place op's `self`.
    """

    @staticmethod
    def forward(ctx, out, feats, weight, bias, row_index, group, layout, drop_cls):
        w = _as(weight, feats.dtype)
        torch.ops.pefomed.grouped_projection_place_(feats, w, bias, out, row_index, group, layout, drop_cls)
        ctx.mark_dirty(out)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(feats, w if ctx.needs_input_grad[1] else weight, row_index)
        ctx.options = (group, layout, drop_cls)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad):
        feats, weight, row_index = ctx.saved_tensors
        d_out_needed, *needs = ctx.needs_input_grad[:4]
        d_feats, d_weight, d_bias = torch.ops.pefomed.grouped_projection_backward(
            grad,
            feats,
            weight,
            row_index,
            *ctx.options,
            needs[0],
            needs[1],
            ctx.bias_dtype is not None and needs[2],
            ctx.weight_dtype,
        )
        # The placed rows replaced out's previous values, which therefore get no gradient there.
        d_out = grad.index_fill(0, row_index, 0) if d_out_needed else None
        return (
            d_out,
            *_parameter_grads(tuple(needs), ctx.bias_dtype, d_feats, d_weight, d_bias),
            None,
            None,
            None,
            None,
        )


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
        raise ValueError(
            f"{_WHERE}: out= and row_index= go together (row_index: the rows of out that receive the image tokens)"
        )
    _check_tensors(feats, weight, bias)
    geo = geometry(feats, weight, group, layout, drop_cls)
    if out is None:
        return ProjectionFunction.apply(feats, weight, bias, group, layout, drop_cls)
    _check_placement(out, row_index, geo.rows, weight.shape[0], feats.device)
    return GroupedPlacementFunction.apply(out, feats, weight, bias, row_index, group, layout, drop_cls)


# --- compile gate ----------------------------------------------------------------------------


def STATIC_CASES() -> list:  # noqa: N802 (the gate's protocol name)
    """What the launchers compile: EVA-g [8, 1025, 1408] -> groups of 4 -> Linear(5632, 4096) in
    bf16 (the fp32 weight cast once), placed into [8 * 512, 4096] embeddings."""
    from pefomed.bench.static import Ptr, StaticCase

    bf16, f32, i64 = torch.bfloat16, torch.float32, torch.int64
    batch, tokens, dim, groups, out_dim, text_len = 8, 1025, 1408, 256, 4096, 512
    feats = {"stride_b": tokens * dim, "stride_t": dim, "stride_d": 1}
    geo = {"R": batch * groups, "N": out_dim, "D": dim, "n_groups": groups, "side": 0, "cls_offset": 1}
    common = {"GROUP": 4, "PRECISION": "tf32"}
    cases = []
    for layout in ("sequence", "spatial"):
        spatial = layout == "spatial"
        g = {**geo, "side": 32 if spatial else 0}  # 1024 patches = a 32 x 32 grid
        cases += [
            StaticCase(
                name=f"visual_proj.forward.placed.{layout}",
                kernel=_forward_tuned,
                args={
                    "feats": Ptr(bf16), "weight": Ptr(bf16), "bias": Ptr(f32), "out": Ptr(bf16), "row_index": Ptr(i64),
                    **g, "out_rows": batch * text_len, **feats, "stride_wn": 4 * dim, "stride_wk": 1, "stride_bias": 1,
                    "stride_om": out_dim, "stride_on": 1, "stride_ri": 1,
                    "SPATIAL": spatial, "HAS_BIAS": True, "PLACED": True, **common,
                },
                mma="bf16", streaming=True,
            ),
            StaticCase(
                name=f"visual_proj.grad_weight.{layout}",
                kernel=_grad_weight_tuned,
                args={
                    "feats": Ptr(bf16), "dy": Ptr(bf16), "row_index": Ptr(i64), "dw": Ptr(f32), "dbias": Ptr(f32),
                    **g, **feats, "stride_dym": out_dim, "stride_dyn": 1, "stride_ri": 1,
                    "stride_dwn": 4 * dim, "stride_dwk": 1, "stride_dbias": 1,
                    "SPATIAL": spatial, "PLACED": True, "HAS_BIAS": True, **common,
                },
                mma="bf16", streaming=True,
            ),
        ]  # fmt: skip
    cases.append(
        StaticCase(
            name="visual_proj.grad_feats",
            kernel=_grad_feats_tuned,
            args={
                "dy": Ptr(bf16), "weight": Ptr(bf16), "row_index": Ptr(i64), "dfeats": Ptr(bf16),
                **geo, **feats, "stride_dym": out_dim, "stride_dyn": 1, "stride_wn": 4 * dim, "stride_wk": 1,
                "stride_ri": 1, "SPATIAL": False, "PLACED": True, **common,
            },
            mma="bf16", streaming=True,
        )
    )  # fmt: skip
    return cases


__all__ = [
    "LAYOUTS",
    "GroupedPlacementFunction",
    "ProjectionFunction",
    "grouped_projection",
    "grouped_projection_reference",
]
