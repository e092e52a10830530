"""RMSNorm (kernels/rms_norm.py) against float64 and against transformers' LlamaRMSNorm.

bf16 runs with the GPU's bf16 semantics (tests/kernels/bf16_interpreter.py, autouse). Every
buffer the launchers allocate is NaN-poisoned, so an element left unwritten fails. Bounds:
- forward, elementwise: HF's bf16 result rounds twice (the normalized row, then the product), so
  |y - y64| <= 2u |y64| (u = 2^-8, bf16's unit roundoff) plus fp32 noise; a missing eps, a wrong mean or a skipped cast is
  off by far more;
- gradients, relative Frobenius error vs float64: 1e-2 for bf16 (the cast of HF's graph rounds
  the upstream gradient once), 2e-5 for fp32; a wrong term gives >= 1e-1.
"""

import pytest
import torch

import pefomed.kernels.rms_norm as mod
from pefomed.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_backward, rms_norm_forward, rms_norm_reference

from .strided import ODD_SIZES, as_layout, layouts_for

GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_new_output", nan_output)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    return x, w


def reference64(x, w, eps, dy=None):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps)
    if dy is None:
        return y64.detach()
    y64.backward(dy.double())
    return y64.detach(), x64.grad, w64.grad


def assert_forward_close(y, y64, dtype):
    assert not torch.isnan(y).any(), "unwritten (NaN-poisoned) output elements"
    if dtype == torch.float32:
        assert rel(y, y64) < 2e-6
    else:
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # unit roundoff: half an ulp, relative
        err = (y.double() - y64).abs()
        assert (err <= 2.02 * u * y64.abs() + 1e-6).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 40), (1, 3), (3, 1, 67), (17, 129), (5, 256)])
def test_forward_backward_vs_float64(dtype, shape):
    x, w = make(shape, dtype)
    x.requires_grad_()
    w.requires_grad_()
    eps = 1e-6
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y64, dx64, dw64 = reference64(x, w, eps, dy)
    assert_forward_close(y, y64, dtype)
    y.backward(dy)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel(x.grad, dx64) < GRAD_TOL[dtype]
    assert rel(w.grad, dw64) < GRAD_TOL[dtype]


def test_matches_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = make((4, 9, 96), torch.bfloat16, seed=3)
    hf = LlamaRMSNorm(96, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(w)
    ref = hf(x)
    y = rms_norm(x, w, 1e-5)
    # the same roundings; only rsqrt's last fp32 bit may differ, which flips a bf16 rounding rarely
    assert (y != ref).float().mean().item() < 0.01
    assert ((y.float() - ref.float()).abs() <= 2.0**-7 * ref.float().abs() + 1e-6).all()


def test_fp32_weight_promotes_like_pytorch():
    x, w = make((6, 48), torch.bfloat16, w_dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32  # weight * bf16 normed -> fp32, as HF's module gives
    ref = rms_norm_reference(x.detach(), w.detach(), 1e-6)
    assert rel(y, ref) < 1e-6  # same single rounding of the normed row; the product is exact in fp32
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy)
    _, dx64, dw64 = reference64(x, w, 1e-6, dy)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert rel(x.grad, dx64) < 1e-2 and rel(w.grad, dw64) < 1e-2


@pytest.mark.parametrize("rows", ODD_SIZES[:4])
def test_odd_rows_and_many_backward_programs(rows):
    """The dW reduction over several programs with uneven row counts."""
    x, w = make((rows, 33), torch.float32, seed=rows)
    dy = torch.randn(rows, 33, generator=torch.Generator().manual_seed(5))
    y, rstd = rms_norm_forward(x, w, 1e-6)
    dx, dw = rms_norm_backward(dy, x, w, rstd)
    _, dx64, dw64 = reference64(x, w, 1e-6, dy)
    assert rel(dx, dx64) < 2e-6 and rel(dw, dw64) < 2e-6
    assert torch.allclose(rstd.double(), torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "strided", "transposed", "offset", "permuted"])
def test_strided_inputs(layout):
    x, w = make((3, 5, 24), torch.bfloat16, seed=7)
    dy = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    y_ref, rstd_ref = rms_norm_forward(x, w, 1e-6)
    dx_ref, dw_ref = rms_norm_backward(dy, x, w, rstd_ref)
    xs = as_layout(x, layout) if layout in layouts_for(x) else x
    dys = as_layout(dy, layout) if layout in layouts_for(dy) else dy
    ws = as_layout(w, layout) if layout in layouts_for(w) else w
    y, rstd = rms_norm_forward(xs, ws, 1e-6)
    dx, dw = rms_norm_backward(dys, xs, ws, rstd)
    # a layout changes no arithmetic: bit-identical
    assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
    assert torch.equal(dx, dx_ref) and torch.equal(dw, dw_ref)


def test_only_requested_gradients():
    x, w = make((4, 16), torch.bfloat16)
    x.requires_grad_()
    y = rms_norm(x, w, 1e-6)  # weight frozen
    y.sum().backward()
    assert x.grad is not None and w.grad is None
    dx, dw = rms_norm_backward(torch.ones(4, 16, dtype=torch.bfloat16), x.detach(), w, rms_norm_forward(x.detach(), w, 1e-6)[1], True, False)
    assert dw.numel() == 0 and not torch.isnan(dx).any()


def test_saves_only_inputs_and_rstd():
    """The lean part: autograd keeps x, weight and the fp32 rstd, not the normalized row."""
    x, w = make((64, 128), torch.bfloat16)
    x.requires_grad_()
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rms_norm(x, w, 1e-6)
    sizes = sorted(t.numel() * t.element_size() for t in saved)
    assert sizes == sorted([x.numel() * 2, w.numel() * 2, 64 * 4])


def test_function_and_op_agree():
    x, w = make((5, 32), torch.bfloat16)
    y_fn, rstd_fn = RMSNormFunction.apply(x, w, 1e-6)
    y_op, rstd_op = torch.ops.pefomed.rms_norm(x, w, 1e-6)
    assert torch.equal(y_fn, y_op) and torch.equal(rstd_fn, rstd_op)


def test_errors_name_the_problem():
    x, w = make((2, 8), torch.bfloat16)
    with pytest.raises(ValueError, match=r"weight must be \[hidden\] = \[8\]"):
        rms_norm(x, torch.ones(7, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        rms_norm(x.double(), w, 1e-6)
