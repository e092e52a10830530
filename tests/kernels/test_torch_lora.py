"""kernels/torch_lora.py (the `kernels: torch` LoRA linear) against the float64 plain-autograd reference.

The reference is `kernels.reference.lora_linear_reference` in float64 with the same dropout mask
passed in: the mask is the one `F.dropout` draws from the same generator state (bernoulli_(1 - p)
on a tensor like x), which is what the eager function draws and later replays.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pefomed.kernels.reference import lora_linear_reference
from pefomed.kernels.torch_lora import lora_linear_eager

# Relative error bounds against float64 (norm of the difference over the norm of the reference):
# fp32 GEMMs of these sizes land near 1e-7; bf16 rounds each GEMM output to 8 bits (~4e-3).
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}
P = 0.25


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(dtype, ab_dtype, bias: bool, shape=(3, 7), m_in=40, m_out=24, r=8, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a transposed view: x is not contiguous
        x = torch.randn(shape[1], shape[0], m_in, generator=g).to(dtype).transpose(0, 1)
    else:
        x = torch.randn(*shape, m_in, generator=g).to(dtype)
    return {
        "x": x.requires_grad_(),
        "weight": (torch.randn(m_out, m_in, generator=g) / m_in**0.5).to(dtype),
        "lora_A": (torch.randn(r, m_in, generator=g) / m_in**0.5).to(ab_dtype).requires_grad_(),
        "lora_B": (torch.randn(m_out, r, generator=g) * 0.3).to(ab_dtype).requires_grad_(),
        "bias": torch.randn(m_out, generator=g).to(dtype).requires_grad_() if bias else None,
    }


def leaves(kw):
    return [t for t in (kw["x"], kw["lora_A"], kw["lora_B"], kw["bias"]) if t is not None]


def fp64(kw):
    out = {}
    for k, t in kw.items():
        out[k] = None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return out


def mask_for_seed(seed: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask F.dropout (and the eager function) draws after manual_seed(seed), 1 = kept."""
    torch.manual_seed(seed)
    return torch.empty(x.shape, dtype=x.dtype).bernoulli_(1 - p) != 0


def run_and_grads(fn, kw, grad_out, **extra):
    y = fn(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 0.5, kw["bias"], **extra)
    grads = torch.autograd.grad(y, leaves(kw), grad_out)
    return y, grads


@pytest.mark.parametrize("dtype,ab_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("dropout", [0.0, P])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_float64_reference(dtype, ab_dtype, dropout, bias, strided):
    kw = make(dtype, ab_dtype, bias, strided=strided)
    grad_out = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    mask = mask_for_seed(11, kw["x"], dropout) if dropout else None
    torch.manual_seed(11)
    y, grads = run_and_grads(lora_linear_eager, kw, grad_out, dropout_p=dropout, training=True)
    ref_kw = fp64(kw)
    y64, grads64 = run_and_grads(lora_linear_reference, ref_kw, grad_out.double(), dropout_p=dropout, training=True,
                                 dropout_mask=mask)  # fmt: skip
    assert y.dtype == dtype and y.shape == (3, 7, 24)
    assert rel(y, y64) < RTOL[dtype]
    for got, want, t in zip(grads, grads64, leaves(kw)):
        assert got.dtype == t.dtype and got.shape == t.shape
        assert rel(got, want) < RTOL[dtype], (t.shape, rel(got, want))


def test_equals_todays_torch_path_bit_for_bit_on_cpu():
    """Same seed, same mask as F.dropout, and the same forward values as plain autograd (fp32)."""
    kw = make(torch.float32, torch.float32, True, shape=(2, 33), m_in=64, m_out=48, r=16)
    grad_out = torch.randn(2, 33, 48, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(3)
    y, grads = run_and_grads(lora_linear_eager, kw, grad_out, dropout_p=P)
    after = torch.rand(4)  # the global stream continues as after F.dropout's draw
    torch.manual_seed(3)
    y_ref, grads_ref = run_and_grads(lora_linear_reference, kw, grad_out, dropout_p=P)
    assert torch.equal(after, torch.rand(4))
    # addmm_ folds `+ scaling * lora` into one rounding: equal to a few fp32 ulps, not bit for bit
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backward_replays_the_mask_whatever_the_rng_did_in_between():
    kw = make(torch.float32, torch.float32, False)
    grad_out = torch.randn(3, 7, 24)
    torch.manual_seed(21)
    y = lora_linear_eager(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 0.5, None, P, True)
    torch.manual_seed(999)
    torch.rand(1000)  # other draws between forward and backward
    grads = torch.autograd.grad(y, leaves(kw), grad_out)
    mask = mask_for_seed(21, kw["x"], P)
    ref = fp64(kw)
    y64 = lora_linear_reference(ref["x"], ref["weight"], ref["lora_A"], ref["lora_B"], 0.5, None, P, True, dropout_mask=mask)
    for got, want in zip(grads, torch.autograd.grad(y64, leaves(ref), grad_out.double())):
        assert rel(got, want) < RTOL[torch.float32]


def test_eval_mode_and_dropout_zero_draw_nothing():
    kw = make(torch.float32, torch.float32, True)
    torch.manual_seed(4)
    y_eval = lora_linear_eager(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 0.5, kw["bias"], P, False)
    y_zero = lora_linear_eager(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 0.5, kw["bias"], 0.0, True)
    state = torch.random.get_rng_state()
    torch.manual_seed(4)
    assert torch.equal(state, torch.random.get_rng_state())
    ref = lora_linear_reference(*(fp64(kw)[k] for k in ("x", "weight", "lora_A", "lora_B")), 0.5, fp64(kw)["bias"])
    assert rel(y_eval, ref) < RTOL[torch.float32] and torch.equal(y_eval, y_zero)


def test_saves_x_once_the_small_projection_and_no_mask():
    """What autograd keeps: x (shared by two adapters on the same input), [N, r], an RNG state."""
    n, m_in, m_out, r = 512, 256, 128, 8
    x = torch.randn(n, m_in, requires_grad=True)
    w = torch.randn(m_out, m_in)
    adapters = [(torch.randn(r, m_in, requires_grad=True), torch.randn(m_out, r, requires_grad=True)) for _ in range(2)]
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t is not w and not any(t is p for ab in adapters for p in ab):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = [lora_linear_eager(x, w, a, b, 2.0, None, 0.1, True) for a, b in adapters]
    saved = sum(storages.values())
    rng = torch.random.get_rng_state().numel()
    assert saved == n * m_in * 4 + 2 * (n * r * 4) + 2 * rng
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        storages.clear()
        ref = [lora_linear_reference(x, w, a, b, 2.0, None, 0.1, True) for a, b in adapters]
    assert sum(storages.values()) >= 2 * 2 * n * m_in * 4  # dropout(x) and the noise, per adapter
    sum(y.sum() for y in ys + ref).backward()


def test_nf4_weight_equals_its_dequantized_dense_weight():
    from pefomed.kernels.nf4 import to_nf4

    kw = make(torch.bfloat16, torch.float32, False, m_in=64, m_out=32)
    q = to_nf4(kw["weight"])
    grad_out = torch.randn(3, 7, 32).to(torch.bfloat16)
    torch.manual_seed(2)
    y, grads = run_and_grads(lora_linear_eager, {**kw, "weight": q}, grad_out, dropout_p=P)
    torch.manual_seed(2)
    y_dense, grads_dense = run_and_grads(lora_linear_eager, {**kw, "weight": q.dequantize()}, grad_out, dropout_p=P)
    assert torch.equal(y, y_dense)
    for got, want in zip(grads, grads_dense):
        assert torch.equal(got, want)


def test_bad_shapes_and_dropout_are_refused():
    kw = make(torch.float32, torch.float32, False)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear_eager(kw["x"], kw["weight"], kw["lora_B"], kw["lora_A"], 0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear_eager(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 0.5, None, 1.0)


def test_gradcheck_float64():
    kw = make(torch.float64, torch.float64, True, shape=(2, 3), m_in=6, m_out=5, r=2)

    def fn(x, a, b, bias):
        torch.manual_seed(0)
        return lora_linear_eager(x, kw["weight"], a, b, 0.7, bias, 0.3, True)

    assert torch.autograd.gradcheck(fn, tuple(leaves(kw)))


@pytest.mark.parametrize("dropout", [0.0, P])
def test_compiled_fullgraph_equals_eager(dropout):
    """torch.compile(fullgraph=True, inductor): with fallback_random, inductor draws eager's masks."""
    import torch._inductor.config as inductor_config

    kw = make(torch.float32, torch.float32, True)
    grad_out = torch.randn(3, 7, 24)

    def step(x, a, b, bias):
        y = lora_linear_eager(x, kw["weight"], a, b, 0.5, bias, dropout, True)
        return F.gelu(y)  # something around the op, as in a decoder layer

    torch.manual_seed(8)
    eager_out = step(*leaves(kw))
    eager_grads = torch.autograd.grad(eager_out, leaves(kw), grad_out)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(step, backend="inductor", fullgraph=True)
        torch.manual_seed(8)
        out = compiled(*leaves(kw))
        grads = torch.autograd.grad(out, leaves(kw), grad_out)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- grouped projections (q/k/v as one GEMM) and the recomputed input ----------------------------


def _qkv(dtype=torch.float32, bias=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    m_in, outs, r = 48, (32, 16, 16), 8
    ws = [(torch.randn(o, m_in, generator=g) / m_in**0.5).to(dtype) for o in outs]
    bs = [torch.randn(o, generator=g).to(dtype) for o in outs] if bias else [None] * 3
    ab = {i: ((torch.randn(r, m_in, generator=g) / m_in**0.5).requires_grad_(),
              (torch.randn(outs[i], r, generator=g) * 0.3).requires_grad_()) for i in (0, 2)}  # fmt: skip
    x = torch.randn(2, 9, m_in, generator=g).to(dtype).requires_grad_()
    return x, ws, bs, ab, outs


@pytest.mark.parametrize("dropout", [0.0, P])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_equals_the_projections_one_by_one(dropout, bias):
    """One GEMM for q/k/v with adapters on q and v: the values, gradients and dropout draws of
    lora_linear_eager(q), F.linear(k), lora_linear_eager(v) called in that order."""
    from pefomed.kernels.torch_lora import grouped_lora_linear

    x, ws, bs, ab, outs = _qkv(bias=bias)
    grad_out = torch.randn(2, 9, sum(outs), generator=torch.Generator().manual_seed(7))
    trained = [x, *ab[0], *ab[2]]
    torch.manual_seed(5)
    one_by_one = torch.cat([
        lora_linear_eager(x, ws[0], *ab[0], 0.5, bs[0], dropout, True),
        F.linear(x, ws[1], bs[1]),
        lora_linear_eager(x, ws[2], *ab[2], 2.0, bs[2], dropout, True),
    ], dim=-1)  # fmt: skip
    after_one_by_one = torch.rand(3)
    want = torch.autograd.grad(one_by_one, trained, grad_out)
    torch.manual_seed(5)
    bias_cat = torch.cat(bs) if bias else None
    adapters = [(0, 32, *ab[0], 0.5, dropout), (48, 64, *ab[2], 2.0, dropout)]
    fused = grouped_lora_linear(x, torch.cat(ws), bias_cat, adapters)
    assert torch.equal(torch.rand(3), after_one_by_one)  # the same draws, in the same order
    got = torch.autograd.grad(fused, trained, grad_out)
    torch.testing.assert_close(fused, one_by_one, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_grouped_without_adapters_keeps_nothing_of_x():
    from pefomed.kernels.torch_lora import grouped_lora_linear

    x, ws, _, _, _ = _qkv()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = grouped_lora_linear(x, torch.cat(ws), None, [])
    assert not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(dx, torch.ones_like(y) @ torch.cat(ws))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_output_is_recomputed_not_kept(dtype):
    """The adapters read RMSNorm's output: they keep the norm's own input, weight and rstd (which
    the norm keeps anyway) and make the output again in backward, bit for bit."""
    from pefomed.kernels.torch_lora import grouped_lora_linear
    from pefomed.models.llama import rms_norm

    resid, ws, _, ab, outs = _qkv(dtype)
    norm_w = (1 + 0.1 * torch.randn(resid.shape[-1])).to(dtype)
    grad_out = torch.randn(2, 9, sum(outs)).to(dtype)
    adapters = [(0, 32, *ab[0], 0.5, P), (48, 64, *ab[2], 2.0, P)]
    trained = [resid, *ab[0], *ab[2]]
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        normed = rms_norm(resid, norm_w, 1e-6)
        y = grouped_lora_linear(normed, torch.cat(ws), None, adapters)
    assert normed.untyped_storage().data_ptr() not in storages
    got = torch.autograd.grad(y, trained, grad_out)
    torch.manual_seed(3)
    normed = rms_norm(resid, norm_w, 1e-6).clone()  # a copy has no recipe: it is kept as it is
    y_kept = grouped_lora_linear(normed, torch.cat(ws), None, adapters)
    assert torch.equal(y, y_kept)
    for g, w in zip(got, torch.autograd.grad(y_kept, trained, grad_out)):
        assert torch.equal(g, w)


def test_an_output_changed_in_place_is_kept_not_recomputed():
    from pefomed.kernels.torch_lora import grouped_lora_linear
    from pefomed.models.llama import rms_norm

    resid, ws, _, ab, outs = _qkv()
    normed = rms_norm(resid, torch.ones(resid.shape[-1]), 1e-6)
    normed.mul_(2.0)  # the recipe no longer describes it
    y = grouped_lora_linear(normed, torch.cat(ws), None, [(0, 32, *ab[0], 0.5, 0.0)])
    (da,) = torch.autograd.grad(y, ab[0][0], torch.ones_like(y))
    ref = fp64({"x": normed, "weight": torch.cat(ws)[:32], "lora_A": ab[0][0], "lora_B": ab[0][1], "bias": None})
    y64 = lora_linear_reference(ref["x"], ref["weight"], ref["lora_A"], ref["lora_B"], 0.5)
    (da64,) = torch.autograd.grad(y64, ref["lora_A"], torch.ones_like(y64))
    assert rel(da, da64) < RTOL[torch.float32]
