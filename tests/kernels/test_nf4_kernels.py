"""The NF4 matmul kernels against float64: the split-K GEMV (M <= 16), dequantize + cuBLAS (more
rows, and every dX), the rank-r expansion that carries LoRA and its dropout mask, the reused
dequantized-weight buffer, strides, 64-bit offsets, and the custom ops under opcheck and inductor.

The references are float64 matmuls with the weight from the NF4 format's definition
(`nf4_reference.reference_dequantize`), not the kernels' own arithmetic. Every buffer the
launchers allocate (outputs, split-K partials, the dequantized weight) is poisoned with NaN, so an
element a kernel forgets to write fails the comparison. Kernels run on the GPU when there is one,
in the Triton interpreter with the GPU's bf16 semantics otherwise (tests/kernels/conftest.py).
Shapes are not multiples of any tile: N = 72 or 40 output features, K = 192 (three 64-blocks a
row), 136 (blocks straddle rows) and 27 (odd).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pefomed.kernels import nf4
from pefomed.kernels.nf4 import (
    clear_dequant_cache,
    dequantize_nf4,
    nf4_dequantize,
    nf4_linear,
    nf4_matmul,
    nf4_matmul_t,
    nf4_op_args,
    set_dequant_cache_budget,
    to_nf4,
)

from .nf4_reference import DEVICE, reference_dequantize, rel
from .strided import as_layout, assert_gaps_untouched, guarded_empty, layouts_for

pytest.importorskip("triton")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# Relative Frobenius error against float64. fp32: fp32 sums (a wrong nibble, block scale or row
# gives > 1e-2). fp16 / bf16: the codes or the weight in that dtype and the output rounding
# (2^-11 / 2^-8 relative each, random). A wrong element among thousands shows at these bounds.
TOL = {F32: 1e-6, F16: 1.5e-3, BF16: 1e-2}


@pytest.fixture(autouse=True)
def _poison_and_fresh_caches(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(nf4, "_new_output", poisoned)
    clear_dequant_cache()
    set_dequant_cache_budget(0)
    yield
    clear_dequant_cache()
    set_dequant_cache_budget(0)


def weight(n, k, nested=True, blocksize=64, dtype=F32):
    """(q on DEVICE, its float64 weight from the format's definition)."""
    q = to_nf4(torch.randn(n, k), blocksize=blocksize, double_quant=nested).to(dtype)
    return q.to(DEVICE), reference_dequantize(q).to(DEVICE)


def randn(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def linear_reference(x, w64, bias=None, xa=None, b=None, scaling=1.0):
    y = x.double() @ w64.T
    if bias is not None:
        y = y + bias.double()
    if xa is not None:
        y = y + scaling * xa.double() @ b.double().T
    return y


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """kernels.lora's packed layout: byte b of a row holds columns 8b..8b+7, bit i = column 8b + i."""
    m, k = keep.shape
    width = -(-k // 8)
    padded = torch.zeros(m, width * 8, dtype=torch.int32, device=keep.device)
    padded[:, :k] = keep.int()
    bits = padded.view(m, width, 8) << torch.arange(8, device=keep.device, dtype=torch.int32)
    return bits.sum(-1).to(torch.uint8)


# --- dequantization into a given buffer ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_dequantize_into_a_buffer_and_its_checks(dtype):
    q, w64 = weight(33, 136, dtype=dtype)
    out = torch.full((33, 136), float("nan"), dtype=dtype, device=DEVICE)
    assert dequantize_nf4(q, out=out) is out
    assert torch.equal(out.double(), w64.to(dtype).double())  # one round to nearest even from fp32
    assert torch.equal(dequantize_nf4(q.t()), out.t())  # a transposed view dequantizes transposed
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dequantize_nf4(q, out=out.t().contiguous().t())


# --- M <= 16: the split-K GEMV ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gemv_matches_float64(dtype, m):
    q, w64 = weight(72, 192, nested=m != 5, dtype=dtype)
    x, bias = randn(m, 192, dtype=dtype), randn(72, dtype=dtype)
    y = nf4_matmul(x, q, bias)
    assert y.shape == (m, 72) and y.dtype == dtype
    assert rel(y, linear_reference(x, w64, bias)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_gemv_lora_epilogue(dtype):
    q, w64 = weight(72, 192, dtype=dtype)
    x, bias = randn(3, 192, dtype=dtype), randn(72, dtype=F32)  # an fp32 bias with bf16 activations
    xa, b = randn(3, 5), randn(72, 5)  # xa in fp32, as kernels.lora makes it; r = 5 < the 16-wide rank tile
    y = nf4_matmul(x, q, bias, lora_xa=xa, lora_b=b.to(dtype), scaling=0.5)
    assert rel(y, linear_reference(x, w64, bias, xa, b.to(dtype), 0.5)) < TOL[dtype]


@pytest.mark.parametrize("k, dtype", [(136, F32), (136, BF16), (27, F32)])
def test_gemv_blocks_that_straddle_rows(k, dtype):
    # K = 136: 64-blocks start mid-row; K = 27: bytes straddle rows too (the per-element path)
    q, w64 = weight(40, k, dtype=dtype)
    x, bias = randn(4, k, dtype=dtype), randn(40, dtype=dtype)
    assert rel(nf4_matmul(x, q, bias), linear_reference(x, w64, bias)) < TOL[dtype]


@pytest.mark.parametrize("blocksize, k", [(32, 96), (128, 256), (256, 512)])
def test_gemv_other_blocksizes(blocksize, k):
    q, w64 = weight(40, k, blocksize=blocksize, nested=blocksize != 256)
    x = randn(2, k)
    assert rel(nf4_matmul(x, q), linear_reference(x, w64)) < TOL[F32]


def test_split_k_is_deterministic_and_rearms_its_counters(monkeypatch):
    q, w64 = weight(72, 192)
    x = randn(5, 192)
    monkeypatch.setitem(nf4._INTERPRETER, "wave", 256)  # many slices: 3 column tiles x 3 K slices
    calls = []
    real = nf4._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(nf4, "_gemv_kernel", Spy())
    first, second = nf4_matmul(x, q), nf4_matmul(x, q)
    assert all(grid[1] > 1 for grid in calls)  # split-K ran
    assert torch.equal(first, second)  # the slices are summed in a fixed order
    assert rel(first, linear_reference(x, w64)) < TOL[F32]
    for counters in nf4._COUNTERS.values():
        assert not counters.any()  # every launch leaves its counters at zero for the next
    monkeypatch.setattr(nf4, "MAX_SPLIT_K", 1)
    calls.clear()
    single = nf4_matmul(x, q)
    assert calls[0][1] == 1 and rel(single, linear_reference(x, w64)) < TOL[F32]


# --- more rows: dequantize once + cuBLAS ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F16, F32])
def test_many_rows_match_float64(dtype):
    q, w64 = weight(72, 136, dtype=dtype)
    x, bias = randn(2, 20, 136, dtype=dtype), randn(72, dtype=dtype)
    y = nf4_matmul(x, q, bias)
    assert y.shape == (2, 20, 72) and y.dtype == dtype
    assert rel(y, linear_reference(x, w64, bias)) < TOL[dtype]
    xa, b = randn(2, 20, 6), randn(72, 6, dtype=dtype)
    y = nf4_matmul(x, q, bias, lora_xa=xa, lora_b=b, scaling=0.25)
    assert rel(y, linear_reference(x, w64, bias, xa, b, 0.25)) < TOL[dtype]


@pytest.mark.parametrize("path_m", [5, 33])
def test_both_paths_agree_at_the_same_shape(monkeypatch, path_m):
    """The GEMV and dequantize + cuBLAS give the float64 answer at one shape (SMALL_M moved)."""
    q, w64 = weight(40, 192)
    x = randn(9, 192)
    monkeypatch.setattr(nf4, "SMALL_M", 16 if path_m == 5 else 0)
    assert rel(nf4_matmul(x, q), linear_reference(x, w64)) < TOL[F32]


# --- dX: dequantize + cuBLAS, the LoRA term with kernels.lora's dropout mask ----------------------------


@pytest.mark.parametrize("m", [3, 37])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_matmul_t_with_the_packed_mask(m, dtype):
    n, k, r, p = 40, 70, 6, 0.3
    q, w64 = weight(n, k, dtype=dtype)
    dy, g, a = randn(m, n, dtype=dtype), randn(m, r), randn(r, k, dtype=dtype)
    keep = torch.rand(m, k, device=DEVICE) >= p
    mask = torch.zeros(m, 16, dtype=torch.uint8, device=DEVICE)  # kernels.lora pads rows to 16 bytes
    mask[:, : -(-k // 8)] = pack_mask(keep)
    dx = nf4_matmul_t(dy, q, lora_g=g, lora_a=a, dropout_p=p, mask=mask)
    ref = dy.double() @ w64 + keep.double() * (g.double() @ a.double()) / (1 - p)
    assert dx.dtype == dtype and rel(dx, ref) < TOL[dtype]


@pytest.mark.parametrize("m, k, p", [(5, 70, 0.0), (37, 70, 0.3), (33, 27, 0.5)])
def test_matmul_t_draws_kernels_lora_mask_from_the_seed(m, k, p):
    from pefomed.kernels.lora import dropout_mask

    n, r, seed = 40, 6, 17
    q, w64 = weight(n, k)
    dy, g, a = randn(m, n), randn(m, r), randn(r, k)
    dx = nf4_matmul_t(dy, q, lora_g=g, lora_a=a, seed=torch.tensor([seed], device=DEVICE), dropout_p=p)
    keep = dropout_mask(seed, (m, k), p, device=DEVICE).double() if p > 0 else 1.0
    assert rel(dx, dy.double() @ w64 + keep * (g.double() @ a.double()) / (1 - p)) < TOL[F32]


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_nf4_linear_forward_and_grads(m, dtype):
    q, w64 = weight(72, 192, nested=m != 5, dtype=dtype)
    x = randn(m, 192, dtype=dtype).requires_grad_()
    bias = randn(72, dtype=dtype).requires_grad_()
    y = nf4_linear(x, q, bias)
    assert rel(y, linear_reference(x.detach(), w64, bias.detach())) < TOL[dtype]
    g = torch.randn(m, 72, dtype=torch.float64, device=DEVICE)
    y.backward(g.to(dtype))
    assert x.grad.dtype == dtype and rel(x.grad, g @ w64) < TOL[dtype]
    assert rel(bias.grad, g.sum(0)) < TOL[dtype]


def test_nf4_linear_grads_reach_the_lora_operands():
    """pefomed::nf4_linear is differentiable in all its float inputs, the LoRA operands included."""
    n, k, m, r = 24, 64, 6, 5
    q, w64 = weight(n, k)
    x, xa, b = (torch.randn(shape, device=DEVICE, requires_grad=True) for shape in ((m, k), (m, r), (n, r)))
    y = nf4_linear(x, q, lora_xa=xa, lora_b=b, scaling=0.7)
    leaves = [t.detach().double().requires_grad_() for t in (x, xa, b)]
    ref = leaves[0] @ w64.T + 0.7 * leaves[1] @ leaves[2].T
    g = torch.randn(m, n, dtype=torch.float64, device=DEVICE)
    y.backward(g.float())
    ref.backward(g)
    assert rel(y, ref.detach()) < 1e-6
    for ours, theirs in zip((x, xa, b), leaves):
        assert rel(ours.grad, theirs.grad) < 1e-6


def test_qlora_through_lora_linear():
    from pefomed.kernels.lora import lora_linear

    m, n, k, r = 7, 40, 70, 4
    q, w64 = weight(n, k)
    x = torch.randn(m, k, device=DEVICE, requires_grad=True)
    a = (torch.randn(r, k, device=DEVICE) * 0.1).requires_grad_()
    b = (torch.randn(n, r, device=DEVICE) * 0.1).requires_grad_()
    y = lora_linear(x, q, a, b, 2.0)
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = xd @ w64.T + 2.0 * (xd @ ad.T) @ bd.T
    assert rel(y, ref.detach()) < 1e-5
    g = torch.randn(m, n, dtype=torch.float64, device=DEVICE)
    y.backward(g.float())
    ref.backward(g)
    for ours, theirs in ((x, xd), (a, ad), (b, bd)):
        assert rel(ours.grad, theirs.grad) < 1e-5


# --- strides: every tensor argument in every layout --------------------------------------------------


ARGS = ["x", "bias", "lora_xa", "lora_b", "out"]


@pytest.mark.parametrize("m", [5, 33])
@pytest.mark.parametrize("arg", ARGS)
def test_any_strides_for_every_argument(m, arg):
    q, w64 = weight(40, 192, dtype=BF16)
    t = {
        "x": randn(m, 192, dtype=BF16),
        "bias": randn(40, dtype=BF16),
        "lora_xa": randn(m, 5),
        "lora_b": randn(40, 5, dtype=BF16),
    }
    ref = linear_reference(t["x"], w64, t["bias"], t["lora_xa"], t["lora_b"], 0.5)
    for layout in layouts_for(t.get(arg, ref)):
        args = dict(t)
        out = None
        if arg == "out":
            out = guarded_empty((m, 40), BF16, layout, device=DEVICE)
        else:
            args[arg] = as_layout(t[arg], layout)
        y = nf4_matmul(args["x"], q, args["bias"], lora_xa=args["lora_xa"], lora_b=args["lora_b"], scaling=0.5, out=out)
        assert rel(y, ref) < TOL[BF16], layout
        if out is not None:
            assert y is out
            assert_gaps_untouched(out)


@pytest.mark.parametrize("m", [3, 37])
@pytest.mark.parametrize("arg", ["dy", "lora_g", "lora_a", "mask", "out"])
def test_matmul_t_any_strides(m, arg):
    n, k, r, p = 40, 70, 6, 0.25
    q, w64 = weight(n, k, dtype=BF16)
    keep = torch.rand(m, k, device=DEVICE) >= p
    t = {
        "dy": randn(m, n, dtype=BF16),
        "lora_g": randn(m, r),
        "lora_a": randn(r, k, dtype=BF16),
        "mask": pack_mask(keep),
    }
    ref = t["dy"].double() @ w64 + keep.double() * (t["lora_g"].double() @ t["lora_a"].double()) / (1 - p)
    for layout in layouts_for(t.get(arg, ref)):
        args = dict(t)
        out = None
        if arg == "out":
            out = guarded_empty((m, k), BF16, layout, device=DEVICE)
        else:
            args[arg] = as_layout(t[arg], layout)
        dx = nf4_matmul_t(
            args["dy"], q, lora_g=args["lora_g"], lora_a=args["lora_a"], dropout_p=p, mask=args["mask"], out=out
        )
        assert rel(dx, ref) < TOL[BF16], layout
        if out is not None:
            assert_gaps_untouched(out)


def _huge_row_stride_view(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, cols] whose last row starts past element 2^31: row stride 2^30 + 1 (a 32-bit int),
    so row * stride overflows 32-bit arithmetic. The storage is allocated but only the rows are
    touched (the pages in between are never faulted in)."""
    stride = 2**30 + 1
    base = torch.empty((rows - 1) * stride + cols, dtype=dtype)
    view = base.as_strided((rows, cols), (stride, 1))
    view.fill_(float("nan"))
    return view


@pytest.mark.skipif(
    DEVICE.type == "cuda", reason="allocates 4 GB of host address space; the GPU runs the gate's IR check"
)
def test_offsets_past_2_31_use_64_bit_arithmetic():
    """The largest-offset path in the interpreter: a 32-bit `row * stride` would wrap and write
    elsewhere (or fault); the GEMV reads x and writes out, the expansion writes dX, that way."""
    q, w64 = weight(40, 64, dtype=BF16)
    x = _huge_row_stride_view(3, 64, BF16)
    x.copy_(randn(3, 64, dtype=BF16))
    out = _huge_row_stride_view(3, 40, BF16)
    y = nf4_matmul(x, q, out=out)
    assert y is out and rel(out, linear_reference(x, w64)) < TOL[BF16]
    dy, g, a = randn(3, 40, dtype=BF16), randn(3, 4), randn(4, 64, dtype=BF16)
    dx = _huge_row_stride_view(3, 64, BF16)
    nf4_matmul_t(dy, q, lora_g=g, lora_a=a, out=dx)
    assert rel(dx, dy.double() @ w64 + g.double() @ a.double()) < TOL[BF16]


# --- the dequantized-weight buffer ------------------------------------------------------------------


@pytest.fixture()
def count_dequantizations(monkeypatch):
    calls = []
    real = nf4.dequantize_nf4

    def counting(q, out_dtype=None, *, out=None):
        calls.append(q.shape)
        return real(q, out_dtype, out=out)

    monkeypatch.setattr(nf4, "dequantize_nf4", counting)
    return calls


def two_layer_step(q1, q2, x):
    """forward layer 1, forward layer 2, backward layer 2, backward layer 1 (as autograd orders them)."""
    x = x.requires_grad_()
    nf4_linear(nf4_linear(x, q1), q2).sum().backward()
    return x.grad


def test_one_buffer_reused_across_layers(count_dequantizations):
    q1, w1 = weight(64, 96)
    q2, w2 = weight(96, 64)
    x = randn(33, 96)
    grad = two_layer_step(q1, q2, x)
    # budget 0: one weight is kept; layer 2's backward still finds its forward's weight, layer 1's does not
    assert count_dequantizations == [(64, 96), (96, 64), (64, 96)]
    assert sum(len(slots) for slots in nf4._CACHE.values()) == 1
    assert rel(grad, torch.ones(33, 96, dtype=torch.float64, device=DEVICE) @ w2 @ w1) < 1e-6


def test_budget_lets_every_backward_reuse_its_forward(count_dequantizations):
    q1, w1 = weight(64, 96)
    q2, w2 = weight(96, 64)
    set_dequant_cache_budget(2 * 64 * 96 * 4)  # both fp32 weights
    grad = two_layer_step(q1, q2, randn(33, 96))
    assert count_dequantizations == [(64, 96), (96, 64)]  # once per weight per step
    assert rel(grad, torch.ones(33, 96, dtype=torch.float64, device=DEVICE) @ w2 @ w1) < 1e-6
    set_dequant_cache_budget(0)
    assert sum(len(slots) for slots in nf4._CACHE.values()) == 0  # shrinking frees them


def test_a_changed_or_different_weight_is_dequantized_again(count_dequantizations):
    q, _ = weight(40, 64)
    x = randn(20, 64)
    nf4_matmul(x, q)
    nf4_matmul(x, q)
    assert len(count_dequantizations) == 1  # the same weight, unchanged: reused
    dense = torch.randn(40, 64, device=DEVICE)
    q.copy_(dense)  # quantizes in place: the codes' version counters move
    assert rel(nf4_matmul(x, q), linear_reference(x, reference_dequantize(q).to(DEVICE))) < 1e-6
    other, w_other = weight(40, 64)  # same shape, other codes
    assert rel(nf4_matmul(x, other), linear_reference(x, w_other)) < 1e-6
    assert len(count_dequantizations) == 3


def test_forgetting_keeps_the_buffer(count_dequantizations):
    q, _ = weight(40, 64)
    x = randn(20, 64)
    nf4_matmul(x, q)
    (slot,) = [s for slots in nf4._CACHE.values() for s in slots]
    buffer = slot.buffer.data_ptr()
    clear_dequant_cache(keep_buffers=True)  # what a one-layer benchmark loop calls between calls
    nf4_matmul(x, q)
    assert len(count_dequantizations) == 2
    assert [s.buffer.data_ptr() for slots in nf4._CACHE.values() for s in slots] == [buffer]


def test_cuda_graph_capture_bypasses_the_caches(monkeypatch):
    """While capturing, nothing is inserted into the caches (captured kernels have not run yet)."""
    monkeypatch.setattr(nf4, "_capturing", lambda device: True)
    q, w64 = weight(40, 192, dtype=BF16)
    for m in (5, 33):
        x = randn(m, 192, dtype=BF16)
        assert rel(nf4_matmul(x, q), linear_reference(x, w64)) < TOL[BF16]
    assert not nf4._CACHE and not nf4._TABLES and not nf4._COUNTERS


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class LaunchRecorder:
    """Stands in for a Triton kernel: records the launch (the interpreter's own host copies are
    not what a GPU launch does, so they stay out of the op log)."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


# allocations of the shapes' sizes, views, and the cuBLAS calls
ALLOWED_PER_CALL = {"empty", "empty_strided", "full", "view", "_unsafe_view", "t", "transpose", "as_strided",
                    "slice", "mm", "addmm", "addmm_", "detach", "alias", "expand"}  # fmt: skip


@pytest.mark.parametrize("m", [5, 33])
def test_a_warm_call_only_launches_kernels(monkeypatch, m):
    """No host sync (`_local_scalar_dense`, `.item()`), no copies or casts per call: after the
    first call the code table, the split-K counters and the weight buffer are on the device."""
    q, _ = weight(40, 192, dtype=BF16)
    x, xa, b = randn(m, 192, dtype=BF16), randn(m, 4), randn(40, 4, dtype=BF16)
    dy, g, a = randn(m, 40, dtype=BF16), randn(m, 4), randn(4, 192, dtype=BF16)
    mask = pack_mask(torch.rand(m, 192, device=DEVICE) > 0.1)
    nf4_matmul(x, q, lora_xa=xa, lora_b=b)
    nf4_matmul_t(dy, q, lora_g=g, lora_a=a, dropout_p=0.1, mask=mask)
    launches = []
    for name in ("_dequant_kernel", "_gemv_kernel", "_expand_kernel"):
        monkeypatch.setattr(nf4, name, LaunchRecorder(name, launches))
    with OpLog() as log:
        nf4_matmul(x, q, lora_xa=xa, lora_b=b)
        nf4_matmul_t(dy, q, lora_g=g, lora_a=a, dropout_p=0.1, mask=mask)
    assert set(log.ops) <= ALLOWED_PER_CALL, sorted(set(log.ops) - ALLOWED_PER_CALL)
    # the weight was dequantized by the warm-up call and is still held: no dequantization at all
    assert launches == (
        ["_gemv_kernel", "_expand_kernel"] if m <= nf4.SMALL_M else ["_expand_kernel", "_expand_kernel"]
    )


# --- errors -----------------------------------------------------------------------------------------


def test_input_errors_and_the_plain_cpu_fallback(monkeypatch):
    q, _ = weight(24, 40)
    with pytest.raises(ValueError, match="x has 41 features"):
        nf4_matmul(randn(2, 41), q)
    with pytest.raises(ValueError, match="lora_xa and lora_b go together"):
        nf4_matmul(randn(2, 40), q, lora_xa=randn(2, 4))
    with pytest.raises(ValueError, match="bias has shape"):
        nf4_matmul(randn(2, 40), q, randn(23))
    with pytest.raises(ValueError, match="out must be torch.float32 of shape \\[2, 24\\]"):
        nf4_matmul(randn(2, 40), q, out=randn(2, 23))
    with pytest.raises(ValueError, match="needs the forward's packed mask \\(mask=\\) or its seed"):
        nf4_matmul_t(randn(2, 24), q, lora_g=randn(2, 3), lora_a=randn(3, 40), dropout_p=0.1)
    with pytest.raises(ValueError, match="mask must be the packed uint8 keep-mask \\[2, >= 5\\]"):
        nf4_matmul_t(randn(2, 24), q, lora_g=randn(2, 3), lora_a=randn(3, 40), dropout_p=0.1,
                     mask=torch.zeros(2, 4, dtype=torch.uint8, device=DEVICE))  # fmt: skip
    with pytest.raises(ValueError, match="2-D \\[out, in\\] weight"):
        nf4_matmul(randn(2, 24), q.t())
    with pytest.raises(TypeError, match="expected an NF4Tensor"):
        nf4_linear(torch.randn(2, 40), torch.randn(24, 40))
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        set_dequant_cache_budget(-1)
    monkeypatch.setattr(nf4, "INTERPRET", False)  # a CPU without the interpreter: no Triton there
    cpu_q = q.cpu()
    with pytest.raises(RuntimeError, match="kernels: torch"):
        nf4_matmul(torch.randn(2, 40), cpu_q)
    assert torch.equal(dequantize_nf4(cpu_q).double(), reference_dequantize(cpu_q))


# --- custom ops: opcheck and inductor ---------------------------------------------------------------


@pytest.mark.parametrize("m", [3, 33])
def test_custom_ops_pass_opcheck(m):
    q, _ = weight(24, 64)
    args = nf4_op_args(q)
    x = randn(m, 64).requires_grad_()
    xa, b, bias = randn(m, 5).requires_grad_(), randn(24, 5).requires_grad_(), randn(24).requires_grad_()
    torch.library.opcheck(torch.ops.pefomed.nf4_linear.default, (x, *args, bias, None, None, 1.0))
    torch.library.opcheck(torch.ops.pefomed.nf4_linear.default, (x, *args, bias, xa, b, 0.5))
    seed = torch.tensor([3], device=DEVICE)
    dy, g, a = randn(m, 24), randn(m, 5), randn(5, 64)
    mask = pack_mask(torch.rand(m, 64, device=DEVICE) > 0.25)
    torch.library.opcheck(torch.ops.pefomed.nf4_matmul_t.default, (dy, *args, None, None, None, 0.0))
    torch.library.opcheck(torch.ops.pefomed.nf4_matmul_t.default, (dy, *args, g, a, seed, 0.25))
    torch.library.opcheck(torch.ops.pefomed.nf4_matmul_t.default, (dy, *args, g, a, None, 0.25, mask))
    torch.library.opcheck(torch.ops.pefomed.nf4_dequantize.default, (*args, torch.bfloat16))


def test_inductor_compiles_every_op_fullgraph_forward_and_backward():
    q, w64 = weight(24, 64)
    bias = randn(24).requires_grad_()
    a, b = (randn(4, 64) * 0.1).requires_grad_(), (randn(24, 4) * 0.1).requires_grad_()
    args = nf4_op_args(q)

    def step(x_small, x_large):
        y = nf4_linear(x_small, q, bias)  # the GEMV
        xa = x_large @ a.t()
        z = nf4_linear(x_large, q, bias, lora_xa=xa, lora_b=b, scaling=0.5)  # dequantize + cuBLAS
        g = torch.ops.pefomed.nf4_matmul_t(z.detach(), *args, None, None, None, 0.0)
        return (y * nf4_dequantize(q).sum(1)).sum() + z.sum() + g.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    inputs = [randn(3, 64).requires_grad_(), randn(33, 64).requires_grad_()]
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    loss = compiled(*inputs)
    loss.backward()
    grads = [t.grad for t in (*inputs, bias, a, b)]
    for t in (bias, a, b):
        t.grad = None
    ref = step(*copies)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for ours, theirs in zip(grads, [t.grad for t in (*copies, bias, a, b)]):
        assert rel(ours, theirs.double()) < 1e-5
    # and against float64: d/dx of sum((x W^T + b) * rowsum(W)) is rowsum(W) W for every row
    assert rel(copies[0].grad, w64.sum(1).expand(3, -1) @ w64) < 1e-6


def test_static_cases_cover_every_kernel():
    """Every Triton kernel of this module is compiled by the gate (bench/static.py) for sm_80/86/90a."""
    nf4._triton_module()
    compiled = {id(case.kernel()) for case in nf4.STATIC_CASES()}
    kernels = {name for name in nf4._TRITON_FUNCTIONS if name.endswith("_kernel")}
    assert kernels == {"_dequant_kernel", "_gemv_kernel", "_expand_kernel"}
    assert all(id(getattr(nf4, name)) in compiled for name in kernels)
