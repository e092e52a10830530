"""Rotate-half RoPE (HF LLaMA's `apply_rotary_pos_emb`) in Triton, with a lean backward.

Layout (Liger-Kernel style): `@triton.jit` kernel, the launchers `rope_forward` / `rope_backward`,
one `torch.autograd.Function` (`RoPEFunction`), the `torch.library` ops `pefomed::rope` (whose
`register_autograd` is the same formula) and `pefomed::rope_backward`, and `rope_reference`.

`rope(q, k, cos, sin)`: q `[B, H, T, D]`, k `[B, KVH, T, D]` (any strides: the usual transposed
view of the `[B, T, H, D]` projection output works as it is), cos / sin `[B, T, D]` (any strides,
e.g. expanded over B). Returns `(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`.

Math: HF's exactly, in `promote(q.dtype, cos.dtype)`: each product and the sum are rounded to
that dtype as PyTorch's eager ops round them (bf16 q and bf16 tables: three bf16 roundings), so
the result equals transformers' bit for bit. The backward is the transposed rotation
    dx1 = g1 * cos1 + g2 * sin2,   dx2 = g2 * cos2 - g1 * sin1     (halves 1 and 2 of D)
computed in fp32 and rounded once to the input's dtype. Nothing is saved but cos and sin (which
the model keeps anyway); cos / sin get no gradient (rotary tables are not trained).

One program per (b, t) position and block of heads: cos and sin are read once per position and
block, each head's row is two half-row loads (128-bit vectors when D's stride is 1). Offsets are
64-bit.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WHERE = "kernels.rope"


def _new_output_like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every buffer the launchers write comes from here (tests swap in a NaN-filled allocator).

    empty_like keeps a dense input's strides (a transposed q gives a transposed output), as the
    fake implementation does, so compiled graphs see the real layout."""
    return torch.empty_like(t, dtype=dtype)


# --- kernel -----------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    T, H,
    stride_xb, stride_xh, stride_xt, stride_xd,
    stride_yb, stride_yh, stride_yt, stride_yd,
    stride_cb, stride_ct, stride_cd, stride_sb, stride_st, stride_sd,
    HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Forward: y = x * cos + rotate_half(x) * sin, rounded per op in y's dtype (PyTorch's eager
    rounding). BACKWARD: y = the transposed rotation of x (a gradient), in fp32, rounded once."""
    pos = tl.program_id(0).to(tl.int64)
    b = pos // T
    t = pos % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    h_ok = heads < H
    c_row = cos_ptr + b * stride_cb + t * stride_ct
    s_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(c_row + d * stride_cd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_row + (d + HALF) * stride_cd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_row + d * stride_sd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_row + (d + HALF) * stride_sd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    mask = h_ok[:, None] & d_ok[None, :]
    x_rows = x_ptr + b * stride_xb + t * stride_xt + heads.to(tl.int64)[:, None] * stride_xh
    x1 = tl.load(x_rows + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + (d + HALF)[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # q * cos, rotate_half(q) * sin and their sum, each rounded to the output dtype
        y1 = (x1 * c1).to(out_ty).to(tl.float32) - (x2 * s1).to(out_ty).to(tl.float32)
        y2 = (x2 * c2).to(out_ty).to(tl.float32) + (x1 * s2).to(out_ty).to(tl.float32)
    y_rows = y_ptr + b * stride_yb + t * stride_yt + heads.to(tl.int64)[:, None] * stride_yh
    tl.store(y_rows + d[None, :] * stride_yd, y1.to(out_ty), mask=mask)
    tl.store(y_rows + (d + HALF)[None, :] * stride_yd, y2.to(out_ty), mask=mask)


# --- launchers --------------------------------------------------------------------------------


def _blocks(heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): all heads of a position in one program up to 32; warps for
    8 elements a thread per half-row tile, so each load is 128 bits of bf16 (8 KV heads x 64 is
    two warps, not four: at four the gate sees 64-bit loads)."""
    block_d = triton.next_power_of_2(half)
    block_h = min(32, triton.next_power_of_2(heads))
    if _INTERPRET:
        return block_h, block_d, 1
    return block_h, block_d, min(8, max(1, block_h * block_d // 256))


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{_WHERE}: q and k must be [B, heads, T, head_dim], got {list(q.shape)} and {list(k.shape)}")
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (t, d):
        raise ValueError(f"{_WHERE}: k {list(k.shape)} does not match q {list(q.shape)} in batch, length or head_dim")
    if cos.shape != (b, t, d) or sin.shape != (b, t, d):
        raise ValueError(
            f"{_WHERE}: cos / sin must be [B, T, head_dim] = {[b, t, d]}, got {list(cos.shape)} / {list(sin.shape)}"
        )
    if d % 2:
        raise ValueError(f"{_WHERE}: head_dim {d} is odd; rotate-half RoPE needs an even head_dim")
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{_WHERE}: {name} is {x.dtype}; the Triton path takes float16, bfloat16 or float32")
    if cos.dtype != sin.dtype:
        raise TypeError(f"{_WHERE}: cos is {cos.dtype} but sin is {sin.dtype}")
    devices = {x.device for x in (q, k, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"{_WHERE}: q, k, cos and sin are on different devices {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"{_WHERE}: the Triton path runs on CUDA tensors, got {q.device}; use `kernels: torch` "
            "(models.llama.rope) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, backward: bool) -> torch.Tensor:
    b, h, t, d = x.shape
    y = _new_output_like(x, out_dtype)
    if y.numel() == 0:
        return y
    block_h, block_d, warps = _blocks(h, d // 2)
    _rope_kernel[(b * t, triton.cdiv(h, block_h))](
        x, cos, sin, y, t, h,
        *x.stride(), *y.stride(), *cos.stride(), *sin.stride(),
        HALF=d // 2, BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return y


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q_rot, k_rot)` in promote(q, cos) / promote(k, cos), laid out like q and k."""
    _check(q, k, cos, sin)
    return (
        _launch(q, cos, sin, torch.promote_types(q.dtype, cos.dtype), False),
        _launch(k, cos, sin, torch.promote_types(k.dtype, cos.dtype), False),
    )


def rope_backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of q and k (in q's and k's dtypes) from those of the rotated q and k."""
    return _launch(dq, cos, sin, q_dtype, True), _launch(dk, cos, sin, k_dtype, True)


# --- torch.library ops and autograd ------------------------------------------------------------


@torch.library.custom_op("pefomed::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_forward(q, k, cos, sin)


@_rope_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype)), torch.empty_like(
        k, dtype=torch.promote_types(k.dtype, cos.dtype)
    )


@torch.library.custom_op("pefomed::rope_backward", mutates_args=())
def _rope_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_backward(dq, dk, cos, sin, q_dtype, k_dtype)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin, q_dtype, k_dtype):
    return torch.empty_like(dq, dtype=q_dtype), torch.empty_like(dk, dtype=k_dtype)


class RoPEFunction(torch.autograd.Function):
    """Rotated (q, k); saves cos and sin only. Also the autograd formula of `pefomed::rope`."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.pefomed.rope(q, k, cos, sin)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.shapes = (q.shape, k.shape)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None) -> tuple:
        cos, sin = ctx.saved_tensors
        # a rotated output that takes no part in the loss has no gradient: its zeros rotate to zeros
        if dq is None:
            dq = cos.new_zeros(ctx.shapes[0], dtype=torch.promote_types(ctx.dtypes[0], cos.dtype))
        if dk is None:
            dk = cos.new_zeros(ctx.shapes[1], dtype=torch.promote_types(ctx.dtypes[1], cos.dtype))
        grad_q, grad_k = torch.ops.pefomed.rope_backward(dq, dk, cos, sin, *ctx.dtypes)
        return (
            grad_q if ctx.needs_input_grad[0] else None,
            grad_k if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


_rope_op.register_autograd(RoPEFunction.backward, setup_context=RoPEFunction.setup_context)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q `[B, H, T, D]` and k `[B, KVH, T, D]` by cos, sin `[B, T, D]`
    (the `LlamaOps.rope` signature)."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{_WHERE}: cos / sin require grad, but the rotary tables get no gradient here; detach them")
    return torch.ops.pefomed.rope(q, k, cos, sin)  # autograd: RoPEFunction's, registered on the op


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (unsqueeze_dim=1), plain autograd."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --- compile gate (bench/static.py) -------------------------------------------------------------


def STATIC_CASES():
    from pefomed.bench.static import Ptr, StaticCase

    bf16 = torch.bfloat16
    t, d = 2048, 128  # LLaMA-3-8B head_dim, a 2k-token batch row
    cases = []
    for heads, backward in ((32, False), (8, False), (32, True)):  # LLaMA-3-8B q heads, kv heads
        # q as the transposed view of the [B, T, H, D] projection: (T*H*D, D, H*D, 1)
        strides = {"stride_xb": t * heads * d, "stride_xh": d, "stride_xt": heads * d, "stride_xd": 1,
                   "stride_yb": t * heads * d, "stride_yh": d, "stride_yt": heads * d, "stride_yd": 1}  # fmt: skip
        block_h, block_d, warps = _blocks(heads, d // 2)
        cases.append(StaticCase(
            name=f"rope.{'bwd' if backward else 'fwd'}.h{heads}",
            kernel=_rope_kernel,
            args={"x_ptr": Ptr(bf16), "cos_ptr": Ptr(bf16), "sin_ptr": Ptr(bf16), "y_ptr": Ptr(bf16),
                  "T": t, "H": heads, **strides,
                  "stride_cb": t * d, "stride_ct": d, "stride_cd": 1, "stride_sb": t * d, "stride_st": d, "stride_sd": 1,
                  "HALF": d // 2, "BACKWARD": backward},
            configs=[triton.Config({"BLOCK_H": block_h, "BLOCK_D": block_d}, num_warps=warps)],
            streaming=True,
        ))  # fmt: skip
    return cases


__all__ = ["RoPEFunction", "rope", "rope_backward", "rope_forward", "rope_reference"]
