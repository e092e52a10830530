"""Rotate-half RoPE (kernels/rope.py) against transformers' apply_rotary_pos_emb and float64.

bf16 runs with the GPU's bf16 semantics (tests/kernels/bf16_interpreter.py, autouse). The
forward rounds as PyTorch's eager bf16 ops do, so it must equal transformers' result bit for bit
(no transcendental inside: products and sums only). The backward is the transposed rotation in
fp32, rounded once: |dq - dq64| <= u |dq64| + fp32 noise elementwise (u = 2^-8 for bf16).
Outputs are NaN-poisoned (the allocator is swapped), and q/k come in the layouts the model
produces (the transposed view of the [B, T, H, D] projection), cos/sin expanded over the batch.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import pefomed.kernels.rope as mod
from pefomed.kernels.rope import RoPEFunction, rope, rope_backward, rope_forward, rope_reference

from .strided import as_layout, layouts_for

U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    def nan_like(t, dtype):
        return torch.full_like(t, float("nan"), dtype=dtype)

    monkeypatch.setattr(mod, "_new_output_like", nan_like)


def tables(b, t, d, dtype, theta=10000.0, positions=None):
    pos = torch.arange(t, dtype=torch.float32) if positions is None else positions.float()
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = pos[..., None] * inv  # [T, D/2] or [B, T, D/2]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if cos.dim() == 2:
        cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)  # one table for the batch (stride 0)
    return cos, sin


def qk(b, h, kvh, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g).to(dtype).transpose(1, 2)  # as the attention makes it
    k = torch.randn(b, t, kvh, d, generator=g).to(dtype).transpose(1, 2)
    return q, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("b", "h", "kvh", "t", "d"), [(2, 4, 2, 7, 16), (1, 3, 3, 1, 8), (2, 5, 1, 9, 64), (1, 33, 33, 3, 2)])
def test_forward_equals_transformers_bit_for_bit(dtype, b, h, kvh, t, d):
    q, k = qk(b, h, kvh, t, d, dtype)
    cos, sin = tables(b, t, d, dtype)
    qo, ko = rope(q, k, cos, sin)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.dtype == q_hf.dtype and ko.dtype == k_hf.dtype
    assert torch.equal(qo, q_hf) and torch.equal(ko, k_hf)
    assert qo.stride() == q.stride()  # laid out like the input, as the fake says


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_vs_float64(dtype):
    b, h, kvh, t, d = 2, 6, 2, 11, 32
    q, k = qk(b, h, kvh, t, d, dtype, seed=1)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = tables(b, t, d, dtype)
    qo, ko = rope(q, k, cos, sin)
    g = torch.Generator().manual_seed(2)
    dq_out, dk_out = torch.randn(qo.shape, generator=g).to(dtype), torch.randn(ko.shape, generator=g).to(dtype)
    torch.autograd.backward([qo, ko], [dq_out, dk_out])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    a, c = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward([a, c], [dq_out.double(), dk_out.double()])
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad)):
        assert got.dtype == dtype
        err = (got.double() - ref).abs()
        assert (err <= 1.02 * U[dtype] * ref.abs() + 1e-5).all(), err.max()


def test_per_sample_positions_and_fp32_tables_promote():
    """Packed / left-padded batches give each sample its positions; fp32 tables promote as in
    PyTorch (the result is fp32)."""
    b, h, t, d = 3, 2, 5, 8
    q, k = qk(b, h, h, t, d, torch.bfloat16, seed=3)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [0, 1, 0, 1, 2]])
    cos, sin = tables(b, t, d, torch.float32, theta=500000.0, positions=positions)
    qo, ko = rope_forward(q, k, cos, sin)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.dtype == torch.float32 and torch.equal(qo, q_hf) and torch.equal(ko, k_hf)


@pytest.mark.parametrize("layout", ["contiguous", "padded", "strided", "transposed", "permuted", "offset"])
def test_any_layout_of_every_argument(layout):
    b, h, t, d = 2, 3, 5, 16
    q, k = qk(b, h, 1, t, d, torch.bfloat16, seed=4)
    cos, sin = tables(b, t, d, torch.bfloat16)
    q_ref, k_ref = rope_forward(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous())
    args = [as_layout(x, layout) if layout in layouts_for(x) else x for x in (q, k, cos.contiguous(), sin.contiguous())]
    qo, ko = rope_forward(*args)
    assert torch.equal(qo, q_ref) and torch.equal(ko, k_ref)
    dq, dk = rope_backward(args[0], args[1], args[2], args[3], torch.bfloat16, torch.bfloat16)
    dq_ref, dk_ref = rope_backward(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous(), torch.bfloat16, torch.bfloat16)
    assert torch.equal(dq, dq_ref) and torch.equal(dk, dk_ref)


def test_saves_only_the_tables_and_handles_an_unused_output():
    q, k = qk(1, 2, 2, 3, 8, torch.bfloat16)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = tables(1, 3, 8, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        qo, ko = rope(q, k, cos, sin)
    assert len(saved) == 2 and all(s.shape == cos.shape for s in saved)
    qo.float().sum().backward()  # k's rotation takes no part: its gradient is zero
    assert k.grad is not None and not k.grad.any() and q.grad.any()


def test_function_matches_op_and_errors():
    q, k = qk(1, 2, 2, 3, 8, torch.bfloat16)
    cos, sin = tables(1, 3, 8, torch.bfloat16)
    a = RoPEFunction.apply(q, k, cos, sin)
    b_ = torch.ops.pefomed.rope(q, k, cos, sin)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])
    with pytest.raises(ValueError, match="odd"):
        rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match=r"cos / sin must be \[B, T, head_dim\]"):
        rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="detach them"):
        rope(q, k, cos.clone().requires_grad_(), sin)
