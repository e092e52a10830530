"""The lean autograd ops of models.llama (RMSNorm, SwiGLU, RoPE) against autograd of HF's math.

The reference is the plain PyTorch formula (transformers' LlamaRMSNorm, `act_fn(gate) * up`,
`apply_rotary_pos_emb`) differentiated by autograd, in float64; the lean versions must give the
same outputs and gradients while saving only their inputs for backward.
"""

import pytest
import torch

from pefomed.models.llama import (
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

SHAPES = [(7, 64), (2, 5, 123), (3, 1, 33)]  # odd sizes, a single row


def rms_norm_float64(x, w, eps):
    """LlamaRMSNorm's formula with every step in float64 (HF itself computes the row in fp32)."""
    x, w = x.double(), w.double()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gs = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    torch.autograd.backward(outs, gs)
    return outs, [t.grad for t in inputs if t.requires_grad]


def saved_bytes(fn, *weights) -> tuple[int, list]:
    """Bytes of the distinct storages autograd keeps for backward (the activations' own included,
    the `weights` not: they are held anyway, as bench.step counts)."""
    seen = {}
    skip = {w.untyped_storage().data_ptr() for w in weights}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for n, _ in seen.values()), sorted(s for _, s in seen.values())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_rms_norm_matches_hf_math_in_float64(shape, weight_grad):
    x = torch.randn(shape, dtype=torch.float64) * 3
    w = (torch.randn(shape[-1], dtype=torch.float64) + 1).requires_grad_(weight_grad)
    x.requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    (got,), got_grads = grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w], g)
    (want,), want_grads = grads(lambda a, b: rms_norm_float64(a, b, 1e-5), [x, w], g)
    assert rel(got, want) < 1e-14
    assert len(got_grads) == len(want_grads) == 1 + weight_grad
    for a, b in zip(got_grads, want_grads):
        assert rel(a, b) < 1e-12


def test_rms_norm_fp32_is_hf_math():
    x = torch.randn(5, 77, requires_grad=True)
    w = torch.randn(77, requires_grad=True)
    g = torch.randn(5, 77)
    (got,), got_grads = grads(lambda a, b: rms_norm(a, b, 1e-5), [x, w], g)
    (want,), want_grads = grads(lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], g)
    assert rel(got, want) < 1e-7
    for a, b in zip(got_grads, want_grads):
        assert rel(a, b) < 1e-6


def test_rms_norm_bf16_keeps_hf_cast_before_the_scale():
    """bf16 x with an fp32 weight: HF casts the normalized row to bf16 and then scales in fp32."""
    x = torch.randn(6, 96).to(torch.bfloat16).requires_grad_()
    w = torch.randn(96).requires_grad_()
    g = torch.randn(6, 96)
    (got,), got_grads = grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w], g)
    (want,), want_grads = grads(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], g)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)  # the same roundings, in the same order
    assert got_grads[0].dtype == torch.bfloat16
    assert rel(got_grads[0], want_grads[0]) < 1e-2 and rel(got_grads[1], want_grads[1]) < 1e-5
    for dtype in (torch.bfloat16, torch.float16):  # a weight in x's dtype: one rounded product
        w2 = torch.randn(96).to(dtype)
        assert torch.equal(rms_norm(x.detach().to(dtype), w2, 1e-6), rms_norm_reference(x.detach().to(dtype), w2, 1e-6))


def test_rms_norm_gradcheck():
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_matches_hf_math_in_float64(shape):
    gate = torch.randn(shape, dtype=torch.float64, requires_grad=True) * 4
    up = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    (got,), got_grads = grads(swiglu, [gate, up], g)
    (want,), want_grads = grads(swiglu_reference, [gate, up], g)
    assert rel(got, want) < 1e-15
    for a, b in zip(got_grads, want_grads):
        assert rel(a, b) < 1e-13
    assert torch.autograd.gradcheck(swiglu, (gate[:2, :5].detach().requires_grad_(), up[:2, :5].detach().requires_grad_()))


def rope_inputs(b=2, t=9, h=6, kv=2, d=16, dtype=torch.float64, equal_halves=True):
    # q, k as the model makes them: transposed views of [B, T, heads, D] projections.
    q = torch.randn(b, t, h, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, t, kv, d, dtype=dtype).transpose(1, 2)
    if equal_halves:  # a real table: cat(freqs, freqs)
        freqs = torch.randn(b, t, d // 2, dtype=dtype) * 3
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
    else:  # any table: the backward must be the exact transpose, not a shortcut that needs equal halves
        cos, sin = torch.randn(b, t, d, dtype=dtype), torch.randn(b, t, d, dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("equal_halves", [True, False])
def test_rope_matches_hf_math_with_gqa_in_float64(equal_halves):
    q, k, cos, sin = rope_inputs(equal_halves=equal_halves)
    q.requires_grad_(), k.requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got, got_grads = grads(rope, [q, k, cos, sin], (gq, gk))
    want, want_grads = grads(rope_reference, [q, k, cos, sin], (gq, gk))
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-15
    for a, b in zip(got_grads, want_grads):
        assert rel(a, b) < 1e-15
    qs, ks = (t[:1, :2, :3].detach().requires_grad_() for t in (q, k))
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos[:1, :3], sin[:1, :3]), (qs, ks))


def test_lean_ops_save_only_their_inputs():
    n, hidden, inter = 40, 64, 160
    x = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(hidden)
    lean, lean_shapes = saved_bytes(lambda: rms_norm(x, w, 1e-5), w)
    plain, _ = saved_bytes(lambda: rms_norm_reference(x, w, 1e-5), w)
    assert lean_shapes == [(n, 1), (n, hidden)] and lean == (n + n * hidden) * 4  # x and the fp32 rstd
    assert plain >= lean
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    wb = w.to(torch.bfloat16)
    lean_bf16, _ = saved_bytes(lambda: rms_norm(xb, wb, 1e-5), wb)
    plain_bf16, _ = saved_bytes(lambda: rms_norm_reference(xb, wb, 1e-5), wb)
    assert lean_bf16 == n * hidden * 2 + n * 4 and plain_bf16 > 1.9 * lean_bf16  # HF keeps an fp32 copy of x

    gate = torch.randn(n, inter, requires_grad=True)
    up = torch.randn(n, inter, requires_grad=True)
    lean, lean_shapes = saved_bytes(lambda: swiglu(gate, up))
    plain, _ = saved_bytes(lambda: swiglu_reference(gate, up))
    assert lean == 2 * n * inter * 4 and plain == 3 * n * inter * 4  # silu(gate) is not kept

    q, k, cos, sin = rope_inputs(dtype=torch.float32)
    q.requires_grad_(), k.requires_grad_()
    lean, lean_shapes = saved_bytes(lambda: rope(q, k, cos, sin))
    assert lean == cos.nbytes + sin.nbytes  # the tables only, which every layer shares
