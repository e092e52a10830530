"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def dot_acc(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b; IEEE picks exact fp32 products (fp32 inputs) over TF32."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p):
    """Dropout keep-mask (kept where the Philox uniform >= p) of the tile (rows x cols) of a
    row-major [*, n_cols] tensor.

    The LoRA dropout mask is this pure function of (seed, element index), so every kernel that
    touches the dropped input (the rank projection, dA, and the LoRA part of dX in both the dense
    and the NF4 backward) draws the same mask without storing it.
    """
    # 64-bit element index: Philox takes it as two 32-bit counter words, so no wrap-around.
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p
