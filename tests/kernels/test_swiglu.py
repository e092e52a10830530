"""SwiGLU (kernels/swiglu.py) against float64 and against PyTorch's eager bf16 `F.silu(g) * u`.

bf16 runs with the GPU's bf16 semantics (tests/kernels/bf16_interpreter.py, autouse); outputs
are NaN-poisoned. Forward: HF's math rounds silu(gate) and the product, so |y - y64| <= 2u |y64|
(u = 2^-8 for bf16), and the result equals PyTorch's eager bf16 result (the same two roundings;
only exp's last fp32 bit could flip one). Gradients are formed in fp32 and rounded once:
|d - d64| <= u |d64| elementwise (plus fp32 noise), far below what a wrong derivative gives.
"""

import pytest
import torch
import torch.nn.functional as F

import pefomed.kernels.swiglu as mod
from pefomed.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_backward, swiglu_forward, swiglu_reference

from .strided import ODD_SIZES, as_layout, layouts_for

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_output(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_new_output", nan_output)


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    return gate, up


def reference64(gate, up, dy):
    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    y64 = swiglu_reference(g64, u64)
    y64.backward(dy.double())
    return y64.detach(), g64.grad, u64.grad


def within(a, ref, k, dtype, floor):
    err = (a.double() - ref).abs()
    return bool((err <= k * U[dtype] * ref.abs() + floor).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 72), (1, 1), (3, 1, 1025), (17, 33)])
def test_forward_backward_vs_float64(dtype, shape):
    gate, up = make(shape, dtype)
    gate.requires_grad_()
    up.requires_grad_()
    y = swiglu(gate, up)
    assert y.dtype == dtype and y.shape == gate.shape and not torch.isnan(y).any()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y64, dg64, du64 = reference64(gate, up, dy)
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert within(y, y64, 2.02, dtype, floor)
    y.backward(dy)
    # dgate: fp32 math of fp32 terms: one rounding plus a few fp32 ulps
    assert within(gate.grad, dg64, 1.02, dtype, floor) if dtype != torch.float32 else torch.allclose(gate.grad.double(), dg64, rtol=1e-5, atol=1e-6)
    # dup = dy * silu(gate) with silu rounded as in the forward: two roundings
    assert within(up.grad, du64, 2.02, dtype, floor) if dtype != torch.float32 else torch.allclose(up.grad.double(), du64, rtol=1e-5, atol=1e-6)


def test_equals_pytorch_eager_bf16():
    gate, up = make((64, 160), torch.bfloat16, seed=4)
    y = swiglu_forward(gate, up)
    ref = F.silu(gate) * up  # HF LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    assert (y != ref).float().mean().item() < 1e-3
    assert ((y.float() - ref.float()).abs() <= 2.0**-7 * ref.float().abs() + 1e-6).all()


@pytest.mark.parametrize("layout", ["padded", "strided", "transposed", "offset", "permuted"])
def test_strided_inputs_and_fused_halves(layout):
    gate, up = make((3, 4, 40), torch.bfloat16, seed=2)
    dy = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y_ref = swiglu_forward(gate, up)
    dg_ref, du_ref = swiglu_backward(dy, gate, up)
    g_s, u_s, d_s = (as_layout(t, layout) if layout in layouts_for(t) else t for t in (gate, up, dy))
    assert torch.equal(swiglu_forward(g_s, u_s), y_ref)
    dg, du = swiglu_backward(d_s, g_s, u_s)
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)


def test_halves_of_a_fused_gate_up_projection():
    gate, up = make((6, 24), torch.bfloat16, seed=5)
    fused = torch.cat([gate, up], -1)  # [M, 2I] as one gate_up linear writes it
    g_view, u_view = fused.chunk(2, -1)  # views with row stride 2I
    assert not g_view.is_contiguous()
    assert torch.equal(swiglu_forward(g_view, u_view), swiglu_forward(gate, up))


@pytest.mark.parametrize("n", ODD_SIZES)
def test_odd_widths_cross_block_boundaries(n):
    gate, up = make((2, n + 256), torch.float32, seed=n)
    dy = torch.randn(2, n + 256, generator=torch.Generator().manual_seed(6))
    y64, dg64, du64 = reference64(gate, up, dy)
    assert torch.allclose(swiglu_forward(gate, up).double(), y64, rtol=1e-6, atol=1e-6)
    dg, du = swiglu_backward(dy, gate, up)
    assert torch.allclose(dg.double(), dg64, rtol=1e-5, atol=1e-6) and torch.allclose(du.double(), du64, rtol=1e-6, atol=1e-6)


def test_saves_only_gate_and_up():
    gate, up = make((32, 64), torch.bfloat16)
    gate.requires_grad_()
    up.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2 and all(s.shape == gate.shape for s in saved)


def test_only_requested_gradients_and_function_matches_op():
    gate, up = make((4, 16), torch.bfloat16)
    up.requires_grad_()
    swiglu(gate, up).sum().backward()
    assert up.grad is not None and gate.grad is None
    assert torch.equal(SwiGLUFunction.apply(gate, up), torch.ops.pefomed.swiglu(gate, up))


def test_errors_name_the_problem():
    gate, up = make((2, 8), torch.bfloat16)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :4])
    with pytest.raises(TypeError, match="one dtype"):
        swiglu(gate, up.float())
