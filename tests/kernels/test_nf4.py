"""NF4 against bitsandbytes 0.50 on the CPU (the format oracle) and a float64 reference."""

import pytest
import torch

bnb_f = pytest.importorskip("bitsandbytes.functional")

from kernels.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, dequantize_nf4_reference, dynamic_map_signed, nf4_linear, nf4_matmul, nf4_matmul_t, quantize_nf4  # noqa: E402

SHAPES = [(72, 136), (33, 64), (5, 27), (130, 257)]  # tails shorter than a block, rows straddling blocks


def bnb_weight(state, shape, dtype):
    nested = state.nested
    return NF4Weight(
        packed=None, absmax=state.absmax, shape=tuple(shape), dtype=dtype, blocksize=state.blocksize,
        offset=state.offset if nested else None, nested_absmax=state.state2.absmax if nested else None,
        nested_code=state.state2.code if nested else None,
    )


def test_code_tables_match_bitsandbytes():
    assert torch.equal(dynamic_map_signed(), bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_matches_bitsandbytes(shape, dtype):
    w = torch.randn(shape, dtype=dtype)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    packed2, state2 = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours2 = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours2.packed, packed2)
    assert torch.equal(ours2.offset, state2.offset) and torch.equal(ours2.nested_absmax, state2.state2.absmax)
    # bitsandbytes' CPU library rounds near-midpoint values of the 8-bit map differently (module docstring)
    assert (ours2.absmax != state2.absmax).float().mean() <= 0.01


# The interpreter converts fp32 to bf16 by truncation, not rounding: bf16 Triton output is a GPU test.
DEQUANT_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DEQUANT_DTYPES)
def test_dequantize_is_bit_identical_to_bitsandbytes(shape, nested, dtype):
    w = torch.randn(shape, dtype=dtype) * 3
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    expected = bnb_f.dequantize_4bit(packed, state)
    q = bnb_weight(state, shape, dtype)
    q.packed = packed
    got = dequantize_nf4(q)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)
    assert torch.equal(dequantize_nf4_reference(q), expected)


@pytest.mark.parametrize("nested", [False, True])
def test_bf16_reference_dequantize_is_bit_identical(nested):
    w = torch.randn(37, 130, dtype=torch.bfloat16)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    q = bnb_weight(state, w.shape, torch.bfloat16)
    q.packed = packed
    assert torch.equal(dequantize_nf4_reference(q), bnb_f.dequantize_4bit(packed, state))


def test_bnb_state_dict_round_trip():
    w = torch.randn(48, 70)
    q = quantize_nf4(w)
    state = q.to_bnb_state_dict("weight")
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"} <= state.keys()
    theirs = bnb_f.QuantState.from_dict({k[len("weight."):]: v for k, v in state.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnb_f.dequantize_4bit(state["weight"], theirs), dequantize_nf4(q))
    back = NF4Weight.from_bnb_state_dict(state, "weight")
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q)) and back.shape == (48, 70)


def rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm())


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fused_matmul_and_grads(m, dtype, tol):
    n, k = 72, 136
    q = quantize_nf4(torch.randn(n, k))
    w64 = dequantize_nf4_reference(q, torch.float32).to(dtype).double()  # the weight as cast for the GEMM
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    y = nf4_linear(x, q, bias)
    ref = x.detach().double() @ w64.T + bias.detach().double()
    assert rel(y, ref) < tol
    g = torch.randn(m, n, dtype=torch.float64)
    y.backward(g.to(dtype))
    assert rel(x.grad, g @ w64) < tol
    assert rel(bias.grad, g.sum(0)) < tol
    assert rel(nf4_matmul_t(g.to(dtype), q), g @ w64) < tol


def test_lora_epilogue():
    m, n, k, r = 9, 40, 70, 5
    q = quantize_nf4(torch.randn(n, k))
    x, xa, b = torch.randn(m, k), torch.randn(m, r), torch.randn(n, r)
    y = nf4_matmul(x, q, None, lora_xa=xa, lora_b=b, scaling=0.5)
    ref = x.double() @ dequantize_nf4_reference(q).double().T + 0.5 * xa.double() @ b.double().T
    assert rel(y, ref) < 1e-5


def test_qlora_through_lora_linear():
    from kernels.lora import lora_linear

    m, n, k, r = 7, 40, 70, 4
    q = quantize_nf4(torch.randn(n, k))
    x = torch.randn(m, k, requires_grad=True)
    a = (torch.randn(r, k) * 0.1).requires_grad_()
    b = (torch.randn(n, r) * 0.1).requires_grad_()
    y = lora_linear(x, q, a, b, 2.0)
    w = dequantize_nf4_reference(q).double()
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = xd @ w.T + 2.0 * (xd @ ad.T) @ bd.T
    assert rel(y, ref.detach()) < 1e-5
    g = torch.randn(m, n, dtype=torch.float64)
    y.backward(g.float())
    ref.backward(g)
    for ours, theirs in ((x, xd), (a, ad), (b, bd)):
        assert rel(ours.grad, theirs.grad) < 1e-5


def test_linear4bit_state_dicts_both_ways():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    theirs = bnb.nn.Linear4bit(70, 48, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move to a device
    sd = theirs.state_dict()
    q = NF4Weight.from_bnb_state_dict(sd, "weight")
    assert torch.equal(dequantize_nf4(q), bnb_f.dequantize_4bit(theirs.weight, theirs.weight.quant_state))
    x = torch.randn(3, 70)
    torch.testing.assert_close(nf4_linear(x, q, sd["bias"]), theirs(x), rtol=1e-5, atol=1e-5)

    ours = quantize_nf4(torch.randn(48, 70))
    state = ours.to_bnb_state_dict("weight")
    # bitsandbytes loads pre-quantized weights through Params4bit.from_prequantized (as transformers does).
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    target = bnb.nn.Linear4bit(70, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    target.weight = bnb.nn.Params4bit.from_prequantized(data=state["weight"], quantized_stats=stats, requires_grad=False, device="cpu")
    torch.testing.assert_close(target(x), x @ dequantize_nf4(ours).T, rtol=1e-5, atol=1e-5)
