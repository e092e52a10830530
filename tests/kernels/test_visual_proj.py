"""The grouped visual-token projection kernel against a float64 PyTorch reference."""

import pytest
import torch

from kernels.reference import grouped_projection_reference
from kernels.visual_proj import grouped_projection

CASES = [  # (batch, patch tokens, D, out_dim, layout, drop_cls, bias)
    (3, 20, 12, 40, "sequence", True, True),
    (2, 36, 10, 23, "spatial", True, False),
    (2, 16, 9, 17, "spatial", False, True),
    (1, 12, 7, 33, "sequence", False, False),
]
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3)]


def rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("b, n, d, out_dim, layout, drop_cls, has_bias", CASES)
def test_forward_and_gradients(b, n, d, out_dim, layout, drop_cls, has_bias, dtype, tol):
    tokens = n + (1 if drop_cls else 0)
    feats = torch.randn(b, tokens, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out_dim, 4 * d) / (4 * d) ** 0.5).to(dtype).requires_grad_()
    bias = torch.randn(out_dim, dtype=dtype, requires_grad=True) if has_bias else None
    y = grouped_projection(feats, weight, bias, group=4, layout=layout, drop_cls=drop_cls)
    f64 = [t.detach().double().requires_grad_() for t in (feats, weight)]
    b64 = bias.detach().double().requires_grad_() if has_bias else None
    ref = grouped_projection_reference(f64[0], f64[1], b64, group=4, layout=layout, drop_cls=drop_cls)
    assert y.shape == ref.shape == (b, n // 4, out_dim)
    assert rel(y, ref) < tol
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    assert rel(weight.grad, f64[1].grad) < tol
    assert rel(feats.grad, f64[0].grad) < tol
    if drop_cls:
        assert bool((feats.grad[:, 0] == 0).all())
    if has_bias:
        assert rel(bias.grad, b64.grad) < tol


def test_spatial_layout_is_pixel_shuffle_order():
    d = 1
    feats = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4x4 grid, raster order
    grouped = grouped_projection_reference(feats, torch.eye(4), None, layout="spatial", drop_cls=False)
    assert grouped[0, 0].tolist() == [0, 1, 4, 5] and grouped[0, 1].tolist() == [2, 3, 6, 7]
    got = grouped_projection(feats, torch.eye(4 * d), None, layout="spatial", drop_cls=False)
    assert torch.equal(got, grouped)


def test_placement_writes_only_the_given_rows():
    b, n, d, out_dim, seq = 2, 8, 6, 10, 7
    feats = torch.randn(b, n + 1, d, requires_grad=True)
    weight = torch.randn(out_dim, 4 * d, requires_grad=True)
    bias = torch.randn(out_dim, requires_grad=True)
    embeds = torch.full((b * seq, out_dim), float("nan"))
    rows = torch.tensor([1, 2, seq + 3, seq + 4])
    keep = torch.ones(b * seq, dtype=torch.bool)
    keep[rows] = False
    embeds[keep] = torch.randn(int(keep.sum()), out_dim)
    before = embeds.clone()
    placed = grouped_projection(feats, weight, bias, out=embeds.clone(), row_index=rows)
    ref = grouped_projection_reference(feats.double(), weight.double(), bias.double(), out=before.double(), row_index=rows)
    assert not torch.isnan(placed).any()
    torch.testing.assert_close(placed[keep], before[keep])
    torch.testing.assert_close(placed.double(), ref, rtol=1e-6, atol=1e-6)
    placed.sum().backward()
    f = feats.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    grouped_projection_reference(f, w, bias.detach().double(), out=before.double(), row_index=rows).sum().backward()
    assert rel(weight.grad, w.grad) < 1e-6 and rel(feats.grad, f.grad) < 1e-6


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="cannot be grouped by 4"):
        grouped_projection(torch.randn(1, 7, 4), torch.randn(3, 16), None)
    with pytest.raises(ValueError, match="even square grid"):
        grouped_projection(torch.randn(1, 13, 4), torch.randn(3, 16), None, layout="spatial")
    with pytest.raises(ValueError, match=r"weight must be \[out_dim, 16\]"):
        grouped_projection(torch.randn(1, 9, 4), torch.randn(3, 12), None)
    with pytest.raises(ValueError, match="row_index"):
        grouped_projection(torch.randn(1, 9, 4), torch.randn(3, 16), None, out=torch.zeros(5, 3))


@pytest.mark.gpu
def test_bf16_on_gpu():
    feats = torch.randn(4, 1025, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(96, 256, device="cuda", dtype=torch.bfloat16) / 16
    y = grouped_projection(feats, weight, None)
    ref = grouped_projection_reference(feats.double(), weight.double(), None)
    assert rel(y, ref) < 1e-2
