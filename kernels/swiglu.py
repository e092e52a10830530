"""SwiGLU `silu(gate) * up` in Triton with a lean backward (saves gate and up only).

Layout (Liger-Kernel style): `@triton.jit` kernels, the launchers `swiglu_forward` /
`swiglu_backward`, one `torch.autograd.Function` (`SwiGLUFunction`), the `torch.library` ops
`pefomed::swiglu` (whose `register_autograd` is the same formula) and `pefomed::swiglu_backward`,
and `swiglu_reference` (HF's `act_fn(gate) * up`).

Math: as HF's LlamaMLP in the activations' dtype: `silu(gate)` is computed in fp32 and rounded to
gate's dtype (what `F.silu` returns), then multiplied by `up` with one more rounding, so a bf16
result equals PyTorch's eager bf16 result up to the last bit of `exp`. The backward recomputes
`sigmoid(gate)` in fp32 instead of saving `silu(gate)` (Liger's trick: one M x I activation
fewer in memory), and forms
    d_up   = dy * silu(gate)
    d_gate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
in fp32, each rounded once to its input's dtype.

Strides: gate, up and dy are any 2-D views of `[..., intermediate]` (e.g. the two halves of a fused
gate_up projection); outputs are new contiguous tensors. Row offsets are 64-bit.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_WHERE = "kernels.swiglu"


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers write comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr, up_ptr, out_ptr, n_cols,
    stride_gm, stride_gn, stride_um, stride_un,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gate_ptr.dtype.element_ty).to(tl.float32)  # F.silu's result, rounded
    tl.store(out_ptr + row * n_cols + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols,
    stride_dm, stride_dn, stride_gm, stride_gn, stride_um, stride_un,
    NEED_DGATE: tl.constexpr, NEED_DUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dm + cols * stride_dn, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    if NEED_DUP:
        act = (g * sig).to(gate_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dup_ptr + row * n_cols + cols, (dy * act).to(dup_ptr.dtype.element_ty), mask=mask)
    if NEED_DGATE:
        u = tl.load(up_ptr + row * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
        dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dgate_ptr + row * n_cols + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)


# --- launchers --------------------------------------------------------------------------------


def _settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): 1024-wide column blocks, 8 elements (128 bits of bf16) a thread."""
    if _INTERPRET:
        return min(256, triton.next_power_of_2(max(n_cols, 1))), 1
    return min(1024, max(128, triton.next_power_of_2(n_cols))), 4


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"{_WHERE}: gate {list(gate.shape)} and up {list(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or gate.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{_WHERE}: gate is {gate.dtype}, up {up.dtype}; expected one dtype of float16, bfloat16, float32")
    if gate.device != up.device:
        raise ValueError(f"{_WHERE}: gate on {gate.device}, up on {up.device}")
    if gate.dim() < 1:
        raise ValueError(f"{_WHERE}: gate and up must have a feature dim, got a scalar")
    if gate.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            f"{_WHERE}: the Triton path runs on CUDA tensors, got {gate.device}; use `kernels: torch` "
            "(models.llama.swiglu) on CPU, or set TRITON_INTERPRET=1 before importing triton"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # a view whenever the leading dims collapse; else a copy


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in gate's dtype and shape (contiguous)."""
    _check(gate, up)
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    out = _new_output(tuple(gate.shape), gate.dtype, gate.device)
    if out.numel():
        block, warps = _settings(n_cols)
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            g2, u2, out, n_cols, g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1), BLOCK_N=block, num_warps=warps
        )
    return out


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_dgate: bool = True, need_dup: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d_gate, d_up)` in gate's dtype (empty where not needed)."""
    g2, u2, d2 = _rows(gate), _rows(up), _rows(dy)
    n_rows, n_cols = g2.shape
    dgate = _new_output(tuple(gate.shape), gate.dtype, gate.device) if need_dgate else gate.new_empty(0)
    dup = _new_output(tuple(up.shape), up.dtype, up.device) if need_dup else up.new_empty(0)
    if gate.numel() and (need_dgate or need_dup):
        block, warps = _settings(n_cols)
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, block))](
            d2, g2, u2, dgate if need_dgate else g2, dup if need_dup else g2, n_cols,
            d2.stride(0), d2.stride(1), g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
            NEED_DGATE=need_dgate, NEED_DUP=need_dup, BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
    return dgate, dup


# --- torch.library ops and autograd ------------------------------------------------------------


@torch.library.custom_op("pefomed::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("pefomed::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_dgate: bool, need_dup: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dy, gate, up, need_dgate, need_dup)


@_swiglu_backward_op.register_fake
def _(dy, gate, up, need_dgate, need_dup):
    return gate.new_empty(gate.shape if need_dgate else (0,)), up.new_empty(up.shape if need_dup else (0,))


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up`; saves gate and up, recomputes sigmoid(gate) in backward.

    `setup_context` / `backward` are also the autograd formula of `pefomed::swiglu`.
    """

    @staticmethod
    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.ops.pefomed.swiglu(gate, up)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        gate, up = ctx.saved_tensors
        need_dgate, need_dup = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dgate, dup = torch.ops.pefomed.swiglu_backward(dy, gate, up, need_dgate, need_dup)
        return dgate if need_dgate else None, dup if need_dup else None


_swiglu_op.register_autograd(SwiGLUFunction.backward, setup_context=SwiGLUFunction.setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` (the `LlamaOps.swiglu` signature)."""
    return torch.ops.pefomed.swiglu(gate, up)  # autograd: SwiGLUFunction's, registered on the op


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF LlamaMLP's `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = SiLU (plain autograd)."""
    return torch.nn.functional.silu(gate) * up


# --- compile gate (bench/static.py) -------------------------------------------------------------


def STATIC_CASES():
    from pefomed.bench.static import Ptr, StaticCase

    bf16 = torch.bfloat16
    cases = []
    block, warps = _settings(11008)
    # LLaMA-2-7B (11008) and LLaMA-3-8B (14336) MLPs; gate/up separate (stride = I) or the
    # halves of a fused gate_up output (row stride 2 I).
    for inter, fused in ((11008, False), (14336, True)):
        row = 2 * inter if fused else inter
        name = f"i{inter}" + (".fused" if fused else "")
        cases.append(StaticCase(
            name=f"swiglu.fwd.{name}", kernel=_swiglu_fwd_kernel,
            args={"gate_ptr": Ptr(bf16), "up_ptr": Ptr(bf16), "out_ptr": Ptr(bf16), "n_cols": inter,
                  "stride_gm": row, "stride_gn": 1, "stride_um": row, "stride_un": 1},
            configs=[triton.Config({"BLOCK_N": block}, num_warps=warps)], streaming=True,
        ))  # fmt: skip
        cases.append(StaticCase(
            name=f"swiglu.bwd.{name}", kernel=_swiglu_bwd_kernel,
            args={"dy_ptr": Ptr(bf16), "gate_ptr": Ptr(bf16), "up_ptr": Ptr(bf16), "dgate_ptr": Ptr(bf16),
                  "dup_ptr": Ptr(bf16), "n_cols": inter, "stride_dm": inter, "stride_dn": 1,
                  "stride_gm": row, "stride_gn": 1, "stride_um": row, "stride_un": 1,
                  "NEED_DGATE": True, "NEED_DUP": True},
            configs=[triton.Config({"BLOCK_N": block}, num_warps=warps)], streaming=True,
        ))  # fmt: skip
    return cases


__all__ = ["SwiGLUFunction", "swiglu", "swiglu_backward", "swiglu_forward", "swiglu_reference"]
