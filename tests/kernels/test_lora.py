"""Fused LoRA linear (kernels/lora.py) against float64 PyTorch.

Every output the launchers allocate is poisoned (NaN, or 0x55 for the int8 mask) so that an
unwritten element fails the comparison. Errors are relative Frobenius norms; the bounds are
far below what a wrong mask, scaling, transpose or missing term produces (>= 1e-1).
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pefomed.kernels.lora as lora_mod
import pefomed.kernels.nf4 as nf4_mod
from pefomed.kernels.lora import (
    dropout_mask,
    lora_backward,
    lora_forward,
    lora_linear,
    lora_linear_reference,
)
from pefomed.kernels.nf4 import NF4Tensor, to_nf4
from pefomed.kernels.reference import lora_linear_reference as torch_path

from .nf4_reference import reference_dequantize

# Relative error bounds vs float64: fp32 dots accumulate in fp32; fp16/bf16 round x, W, xa and y.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, 0x55, dtype=dtype, device=device)

    monkeypatch.setattr(lora_mod, "_new_output", poisoned)
    monkeypatch.setattr(nf4_mod, "_new_output", poisoned)  # the QLoRA base GEMMs


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _inputs(x_shape, n_out, r, dtype, *, bias=True, lora_dtype=torch.float32, x_grad=True):
    dev = _device()
    k = x_shape[-1]
    x = torch.randn(x_shape, dtype=dtype, device=dev).requires_grad_(x_grad)
    weight = (torch.randn(n_out, k, device=dev) / math.sqrt(k)).to(dtype)
    lora_a = (torch.randn(r, k, device=dev) / math.sqrt(k)).to(lora_dtype).requires_grad_()
    lora_b = torch.randn(n_out, r, device=dev).to(lora_dtype).requires_grad_()
    b = torch.randn(n_out, device=dev).to(dtype).requires_grad_() if bias else None
    return x, weight, lora_a, lora_b, b


def _float64_reference(x, weight, lora_a, lora_b, scaling, b, p, seed, dy):
    """Forward and grads of the plain-PyTorch formula in float64 with the kernels' mask."""
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = lora_linear_reference(leaves[0], weight.double(), leaves[1], leaves[2], scaling, b64, p, True, seed=seed)
    y.backward(dy.double())
    grads = [t.grad for t in leaves] + [b64.grad if b64 is not None else None]
    return y.detach(), grads


CASES = [
    # x shape, out, r, bias, dropout
    ((37, 72), 56, 8, True, 0.0),
    ((37, 72), 56, 8, False, 0.3),
    ((5, 33), 129, 16, True, 0.3),
    ((5, 33), 129, 16, False, 0.0),
    ((3, 7, 40), 24, 12, True, 0.3),
]


def _check_parity(x_shape, n_out, r, use_bias, p, dtype, lora_dtype=torch.float32):
    x, weight, lora_a, lora_b, b = _inputs(x_shape, n_out, r, dtype, bias=use_bias, lora_dtype=lora_dtype)
    scaling, seed = 0.75, 1234
    y = lora_linear(x, weight, lora_a, lora_b, scaling, b, p, True, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = _float64_reference(x, weight, lora_a, lora_b, scaling, b, p, seed, dy)

    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n_out)
    assert _rel(y.detach(), y_ref) < TOL[dtype]
    got = [x.grad, lora_a.grad, lora_b.grad, b.grad if b is not None else None]
    for name, g, want in zip(("dx", "dA", "dB", "dbias"), got, grads_ref):
        if want is None:
            continue
        assert g is not None and torch.isfinite(g).all(), name
        assert _rel(g, want) < TOL[dtype], (name, _rel(g, want))
    assert x.grad.dtype == dtype and lora_a.grad.dtype == lora_dtype and lora_b.grad.dtype == lora_dtype
    assert weight.grad is None


@pytest.mark.parametrize("x_shape,n_out,r,use_bias,p", CASES)
def test_matches_float64_fp32(x_shape, n_out, r, use_bias, p):
    _check_parity(x_shape, n_out, r, use_bias, p, torch.float32)


@pytest.mark.parametrize("x_shape,n_out,r,use_bias,p", [CASES[1], CASES[2]])
def test_matches_float64_fp16_with_fp32_adapter(x_shape, n_out, r, use_bias, p):
    _check_parity(x_shape, n_out, r, use_bias, p, torch.float16, lora_dtype=torch.float32)


def test_matches_float64_fp16_adapter_in_fp16():
    _check_parity((37, 72), 56, 8, True, 0.3, torch.float16, lora_dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("x_shape,n_out,r,use_bias,p", CASES + [((300, 520), 1000, 64, True, 0.1)])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_bf16(x_shape, n_out, r, use_bias, p, lora_dtype):
    _check_parity(x_shape, n_out, r, use_bias, p, torch.bfloat16, lora_dtype=lora_dtype)


@pytest.mark.parametrize("r", [5, 24, 64])
def test_ranks_are_padded_with_masks(r):
    _check_parity((19, 40), 33, r, True, 0.2, torch.float32)


def test_strided_x_and_transposed_weight_are_read_in_place():
    x_big, _, lora_a, lora_b, b = _inputs((21, 90), 34, 8, torch.float32)
    x = x_big.detach()[:, ::2].requires_grad_()  # non-contiguous rows and columns
    weight = (torch.randn(45, 34, device=x.device) / 7).t()  # [out, in] with strides (1, out)
    y = lora_linear(x, weight, lora_a[:, :45].detach().requires_grad_(), lora_b, 2.0, b, 0.3, seed=9)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = _float64_reference(x, weight, lora_a[:, :45], lora_b, 2.0, b, 0.3, 9, dy)
    assert _rel(y.detach(), y_ref) < TOL[torch.float32]
    assert _rel(x.grad, grads_ref[0]) < TOL[torch.float32]


def test_gradients_agree_with_finite_differences_of_the_kernel():
    """The autograd wrapper is consistent with its own forward (same seed, same mask)."""
    x, weight, lora_a, lora_b, b = _inputs((13, 24), 20, 8, torch.float32)
    seed, p, s = 77, 0.4, 1.5
    dy = torch.randn(13, 20, device=x.device)
    (lora_linear(x, weight, lora_a, lora_b, s, b, p, seed=seed) * dy).sum().backward()
    eps = 1e-2
    for leaf, grad in ((lora_a, lora_a.grad), (x, x.grad), (lora_b, lora_b.grad)):
        direction = torch.randn_like(leaf)
        with torch.no_grad():
            leaf += eps * direction
            up = (lora_linear(x, weight, lora_a, lora_b, s, b, p, seed=seed).double() * dy).sum()
            leaf -= 2 * eps * direction
            down = (lora_linear(x, weight, lora_a, lora_b, s, b, p, seed=seed).double() * dy).sum()
            leaf += eps * direction
        numeric = (up - down) / (2 * eps)
        analytic = (grad.double() * direction).sum()
        assert abs(numeric - analytic) < 2e-3 * max(1.0, abs(analytic.item()))


def test_backward_uses_the_forward_mask():
    """With W = 0, A = B = I and scaling 1, y = dropout(x): the mask is visible in y, and dA must
    be dY^T (mask * x / (1-p)) with that very mask."""
    dev, p, seed, m, k = _device(), 0.5, 2024, 40, 16
    x = torch.randn(m, k, device=dev)
    weight = torch.zeros(k, k, device=dev)
    eye_a = torch.eye(k, device=dev).requires_grad_()
    eye_b = torch.eye(k, device=dev).requires_grad_()
    y = lora_linear(x, weight, eye_a, eye_b, 1.0, None, p, seed=seed)
    kept = y.detach() != 0
    assert torch.equal(kept, dropout_mask(seed, x.shape, p, device=dev))
    torch.testing.assert_close(y.detach()[kept], x[kept] / (1 - p))
    dy = torch.randn(m, k, device=dev)
    y.backward(dy)
    dropped_x = x.double() * kept / (1 - p)
    assert _rel(eye_a.grad, dy.double().T @ dropped_x) < 1e-6
    assert _rel(eye_b.grad, dy.double().T @ dropped_x) < 1e-6


def test_dropout_mask_statistics():
    p, shape = 0.3, (256, 1000)
    mask = dropout_mask(11, shape, p)
    raw = mask.view(torch.uint8)
    assert ((raw == 0) | (raw == 1)).all(), "mask elements left unwritten"
    n = mask.numel()
    kept = mask.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # Neighbouring elements are independent: P(both kept) = (1-p)^2.
    both = (mask[:, 1:] & mask[:, :-1]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt(0.25 / (n - shape[0]))
    # No row or column is degenerate.
    assert mask.double().mean(1).min() > 0.5 and mask.double().mean(0).min() > 0.45


def test_same_seed_same_output_other_seed_other_mask():
    x, weight, lora_a, lora_b, b = _inputs((9, 20), 12, 8, torch.float32, x_grad=False)
    with torch.no_grad():
        y1 = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5, seed=5)
        y2 = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5, seed=5)
        y3 = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5, seed=6)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    m5, m6 = dropout_mask(5, x.shape, 0.5), dropout_mask(6, x.shape, 0.5)
    assert torch.equal(m5, dropout_mask(torch.tensor(5), x.shape, 0.5))
    assert (m5 != m6).double().mean() > 0.3


def test_seed_none_follows_torch_generator_and_eval_disables_dropout():
    x, weight, lora_a, lora_b, b = _inputs((9, 20), 12, 8, torch.float32, x_grad=False)
    with torch.no_grad():
        torch.manual_seed(3)
        first = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5)
        second = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5)
        torch.manual_seed(3)
        again = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5)
        evaluated = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.5, training=False)
        no_dropout = lora_linear_reference(x.double(), weight.double(), lora_a.double(), lora_b.double(), 1.0, b.double())
    assert torch.equal(first, again) and not torch.allclose(first, second)
    assert _rel(evaluated, no_dropout) < TOL[torch.float32]


def test_torch_path_uses_torch_dropout_without_seed():
    """`kernels: torch` (seed=None): F.dropout's mask, still an unbiased dropout of x."""
    x = torch.randn(64, 32, dtype=torch.float64)
    weight, eye = torch.zeros(32, 32, dtype=torch.float64), torch.eye(32, dtype=torch.float64)
    y = lora_linear_reference(x, weight, eye, eye, 1.0, None, 0.25, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.6 < kept.double().mean() < 0.9


def test_no_dx_when_x_needs_no_grad_and_weight_gets_none():
    x, weight, lora_a, lora_b, b = _inputs((11, 24), 16, 8, torch.float32, x_grad=False)
    y = lora_linear(x, weight, lora_a, lora_b, 1.0, b, 0.2, seed=1)
    y.sum().backward()
    assert x.grad is None and weight.grad is None
    assert lora_a.grad is not None and lora_b.grad is not None and b.grad is not None
    seed = torch.tensor([1])
    y2, xa = lora_forward(x, weight, lora_a.detach(), lora_b.detach(), 1.0, b.detach(), 0.2, seed)
    dx, d_a, d_b = lora_backward(torch.ones_like(y2), x, weight, lora_a, lora_b, xa, 1.0, 0.2, seed, need_dx=False)
    assert dx is None
    torch.testing.assert_close(d_a, lora_a.grad)
    torch.testing.assert_close(d_b, lora_b.grad)


def test_frozen_bias_gets_no_grad():
    x, weight, lora_a, lora_b, b = _inputs((6, 24), 16, 8, torch.float32)
    b.requires_grad_(False)
    lora_linear(x, weight, lora_a, lora_b, 1.0, b).sum().backward()
    assert b.grad is None and x.grad is not None


def test_forward_writes_into_out():
    x, weight, lora_a, lora_b, b = _inputs((10, 24), 40, 8, torch.float32, x_grad=False)
    out = torch.full((10, 40), float("nan"), device=x.device)
    y, xa = lora_forward(x, weight, lora_a.detach(), lora_b.detach(), 0.5, b.detach(), 0.0, None, out=out)
    assert y is out
    ref = lora_linear_reference(x.double(), weight.double(), lora_a.double(), lora_b.double(), 0.5, b.double())
    assert _rel(out, ref) < TOL[torch.float32]
    assert _rel(xa, x.double() @ lora_a.detach().double().T) < TOL[torch.float32]


def test_bad_inputs_raise_clear_errors():
    x, weight, lora_a, lora_b, b = _inputs((4, 24), 16, 8, torch.float32, x_grad=False)
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear(x, weight.half(), lora_a, lora_b, 1.0)
    with pytest.raises(TypeError, match="float64"):
        lora_linear(x.double(), weight.double(), lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, weight, lora_a[:, :20], lora_b, 1.0)
    with pytest.raises(ValueError, match="bias has shape"):
        lora_linear(x, weight, lora_a, lora_b, 1.0, b[:5])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, weight, lora_a, lora_b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="requires_grad_"):
        lora_linear(x, weight.requires_grad_(), lora_a, lora_b, 1.0)


def test_compiles_fullgraph_without_graph_break():
    x, weight, lora_a, lora_b, b = _inputs((2, 9, 24), 20, 8, torch.float32)

    def step(x, weight, lora_a, lora_b, b, seed):
        return lora_linear(x, weight, lora_a, lora_b, 0.5, b, 0.25, True, seed=seed).square().sum()

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = (x, lora_a, lora_b, b)
    loss = compiled(x, weight, lora_a, lora_b, b, 42)
    grads = torch.autograd.grad(loss, leaves)
    loss_eager = step(x, weight, lora_a, lora_b, b, 42)
    grads_eager = torch.autograd.grad(loss_eager, leaves)
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)
    # seed=None draws its seed with torch.randint inside the graph: still one graph.
    compiled(x, weight, lora_a, lora_b, b, None).backward()


@pytest.mark.parametrize("quantize", [None, to_nf4])
def test_engine_layer_triton_matches_torch_path(quantize):
    from pefomed.engine.lora import LoRALinear
    from pefomed.engine.ops import kernel_ops

    def layer(kernels):
        lora_fn = kernel_ops(kernels, _device()).lora_linear
        return LoRALinear(24, 18, True, r=8, alpha=16, dropout=0.1, lora_fn=lora_fn, quantize=quantize).to(_device())

    torch_layer, triton_layer = layer("torch"), layer("triton")
    triton_layer.load_state_dict(torch_layer.state_dict())
    torch.nn.init.normal_(triton_layer.lora_B.weight)
    torch_layer.load_state_dict(triton_layer.state_dict())
    assert isinstance(triton_layer.weight, NF4Tensor) == (quantize is not None)
    x = torch.randn(3, 5, 24, device=_device())
    torch_layer.eval(), triton_layer.eval()
    assert _rel(triton_layer(x).detach(), torch_layer(x).detach().double()) < TOL[torch.float32]


QLORA_CASES = [
    # x shape, out, dtype, bias, dropout: K = 128 reads bytes in pairs; K = 27 lets bytes straddle rows
    ((3, 11, 128), 72, torch.float16, True, 0.0),
    ((3, 11, 128), 72, torch.float32, False, 0.3),
    ((37, 27), 40, torch.float32, True, 0.5),
]


@pytest.mark.parametrize("x_shape,n_out,dtype,use_bias,p", QLORA_CASES)
def test_qlora_nf4_base_matches_float64_reference(x_shape, n_out, dtype, use_bias, p):
    """QLoRA: an NF4 base weight, checked against float64 with the weight from the NF4 format's definition."""
    x, dense, lora_a, lora_b, b = _inputs(x_shape, n_out, 8, dtype, bias=use_bias)
    q = to_nf4(dense, blocksize=64, double_quant=True)
    scaling, seed = 2.0, 31
    y = lora_linear(x, q, lora_a, lora_b, scaling, b, p, True, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64 = reference_dequantize(q).to(x.device)
    y_ref, grads_ref = _float64_reference(x, w64, lora_a, lora_b, scaling, b, p, seed, dy)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n_out)
    assert _rel(y.detach(), y_ref) < TOL[dtype]
    got = [x.grad, lora_a.grad, lora_b.grad, b.grad if b is not None else None]
    for name, g, want in zip(("dx", "dA", "dB", "dbias"), got, grads_ref):
        if want is not None:
            assert _rel(g, want) < TOL[dtype], (name, _rel(g, want))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_qlora_runs_the_nf4_ops_and_the_adapter_ops():
    """One set of ops: the NF4 base GEMMs are pefomed::nf4_*, the adapter parts pefomed::lora_*."""
    x, dense, lora_a, lora_b, b = _inputs((5, 64), 24, 4, torch.float32)
    q = to_nf4(dense)
    log = _OpLog()
    with log:
        lora_linear(x, q, lora_a, lora_b, 1.0, b, 0.2, True, seed=7).sum().backward()
    ours = {name for name in log.names if name.startswith("pefomed::")}
    assert ours == {"pefomed::lora_project", "pefomed::nf4_linear", "pefomed::lora_adapter_backward", "pefomed::nf4_matmul_t"}


def test_qlora_torch_path_matches_float64():
    """`kernels: torch` with an NF4Tensor: F.linear dequantizes in PyTorch, in x's dtype."""
    x, dense, lora_a, lora_b, b = _inputs((4, 9, 70), 33, 8, torch.float32)
    q = to_nf4(dense.bfloat16())  # a bf16 checkpoint's NF4, computed in fp32 like bitsandbytes' compute_dtype
    mask = torch.rand(x.shape, device=x.device) >= 0.25
    y = torch_path(x, q, lora_a, lora_b, 0.5, b, 0.25, True, dropout_mask=mask)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b, b)]
    w64 = reference_dequantize(q).to(x.device)
    dropped = leaves[0] * mask / 0.75
    ref = leaves[0] @ w64.T + leaves[3] + 0.5 * (dropped @ leaves[1].T) @ leaves[2].T
    ref.backward(dy.double())
    assert _rel(y.detach(), ref.detach()) < TOL[torch.float32]
    for name, ours, theirs in zip(("dx", "dA", "dB", "dbias"), (x, lora_a, lora_b, b), leaves):
        assert _rel(ours.grad, theirs.grad) < TOL[torch.float32], name
    assert isinstance(q, NF4Tensor) and q.dtype == torch.bfloat16  # the weight passed in is unchanged


def test_custom_ops_pass_opcheck():
    x, weight, lora_a, lora_b, b = (t.detach() for t in _inputs((7, 40), 24, 5, torch.float32, x_grad=False))
    seed = torch.tensor([11], device=x.device)
    xa = torch.randn(7, 5, device=x.device)
    dy = torch.randn(7, 24, device=x.device)
    torch.library.opcheck(torch.ops.pefomed.lora_linear_forward.default, (x, weight, lora_a, lora_b, b, seed, 0.5, 0.3))
    torch.library.opcheck(torch.ops.pefomed.lora_linear_backward.default, (dy, x, weight, lora_a, lora_b, xa, seed, 0.5, 0.3, True))
    torch.library.opcheck(torch.ops.pefomed.lora_project.default, (x, lora_a, seed, 0.3))
    torch.library.opcheck(torch.ops.pefomed.lora_adapter_backward.default, (dy, x, lora_a, lora_b, xa, seed, 0.5, 0.3))


def test_qlora_rejects_a_transposed_nf4_weight():
    x, dense, lora_a, lora_b, _ = _inputs((4, 64), 64, 4, torch.float32)
    with pytest.raises(ValueError, match="not a transposed view"):
        lora_linear(x, to_nf4(dense).t(), lora_a, lora_b, 1.0)


def test_qlora_compiles_fullgraph():
    x, dense, lora_a, lora_b, b = _inputs((6, 64), 40, 8, torch.float32)
    q = to_nf4(dense)

    def step(x, q, lora_a, lora_b, b):
        return lora_linear(x, q, lora_a, lora_b, 0.5, b, 0.2, True, seed=3).square().sum()

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    leaves = (x, lora_a, lora_b, b)
    loss = torch.compile(step, backend=backend, fullgraph=True)(x, q, lora_a, lora_b, b)
    grads = torch.autograd.grad(loss, leaves)
    loss_eager = step(x, q, lora_a, lora_b, b)
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(grads, torch.autograd.grad(loss_eager, leaves)):
        torch.testing.assert_close(g, ge)
