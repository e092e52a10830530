"""NF4 against bitsandbytes 0.50 on the CPU (the format oracle) and a float64 reference.

Every buffer the launchers allocate is poisoned with NaN, so an element a kernel forgets to write
fails the comparison. The shapes are not multiples of the tiles, and the flattened weights have
64-blocks that straddle rows, tail blocks shorter than 64 and nested 256-blocks cut short.
"""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_f

from pefomed.kernels import nf4
from pefomed.kernels.nf4 import (
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_map_signed,
    nf4_dequantize,
    nf4_linear,
    nf4_matmul,
    quantize_nf4,
    register_nf4_weight,
)

# (72, 136): rows of 136 straddle 64-blocks; (5, 27): odd row length, odd count, tail of 7;
# (130, 257): 523 blocks, so 3 nested blocks, the last of 11; (3, 1): a single short block.
SHAPES = [(72, 136), (33, 64), (5, 27), (130, 257), (3, 1)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(nf4, "_new_output", poisoned)


def bnb_eager(fn, *args, **kwargs):
    """bitsandbytes' torch fallbacks are torch.compile'd; run them eagerly (same ops, no compile time)."""
    with torch.compiler.set_stance("force_eager"):
        return fn(*args, **kwargs)


def bnb_quantize(w, nested):
    return bnb_eager(bnb_f.quantize_4bit, w, blocksize=64, compress_statistics=nested, quant_type="nf4")


def bnb_dequantize(packed, state, out_dtype):
    state = copy.copy(state)
    state.dtype = out_dtype  # bitsandbytes dequantizes to the state's dtype
    return bnb_eager(bnb_f.dequantize_4bit, packed, state)


def rel(a, b):
    """Relative Frobenius error of `a` against the float64 reference `b`."""
    return float((a.detach().double() - b).norm() / b.norm())


# --- format ------------------------------------------------------------------------------------


def test_code_tables_match_bitsandbytes():
    assert torch.equal(dynamic_map_signed(), bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))


def assert_same_quantization(ours, packed, state):
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.nested == state.nested
    if state.nested:
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_is_byte_identical_to_bitsandbytes(shape, dtype, nested):
    w = (torch.randn(shape) * torch.randn(shape).exp()).to(dtype)  # heavy tails spread the absmax
    packed, state = bnb_quantize(w, nested)
    ours = quantize_nf4(w, double_quant=nested)
    assert_same_quantization(ours, packed, state)
    assert ours.shape == tuple(shape) and ours.dtype == dtype


def test_nested_absmax_codes_identical_on_a_large_weight():
    # 8000 absmax values through bitsandbytes' C++ 8-bit quantizer (its 65536-bin table, not exact rounding)
    w = torch.randn(500, 1024) * torch.rand(500, 1).mul(5).exp()
    packed, state = bnb_quantize(w, True)
    assert_same_quantization(quantize_nf4(w), packed, state)


@pytest.mark.parametrize("nested", [False, True])
def test_quantize_zero_blocks_like_bitsandbytes(nested):
    w = torch.randn(7, 50)
    w[:3] = 0.0  # whole zero blocks
    w[-1, -14:] = 0.0  # a zero tail block: bitsandbytes stores its absmax clamped to 1e-38
    packed, state = bnb_quantize(w, nested)
    assert_same_quantization(quantize_nf4(w, double_quant=nested), packed, state)
    constant = torch.full((6, 64), 0.5)  # every absmax equal: the centred absmax is all zero
    packed, state = bnb_quantize(constant, nested)
    assert_same_quantization(quantize_nf4(constant, double_quant=nested), packed, state)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_is_bit_identical_to_bitsandbytes(shape, nested, out_dtype):
    w = torch.randn(shape, dtype=torch.float16) * 3
    packed, state = bnb_quantize(w, nested)
    expected = bnb_dequantize(packed, state, out_dtype)
    q = quantize_nf4(w, double_quant=nested)
    got = dequantize_nf4(q, out_dtype)
    assert got.dtype == expected.dtype == out_dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    assert torch.equal(dequantize_nf4_reference(q, out_dtype), expected)
    assert torch.equal(nf4_dequantize(q, out_dtype), expected)


def test_dequantize_defaults_to_the_original_dtype():
    q = quantize_nf4(torch.randn(9, 40, dtype=torch.bfloat16))
    assert q.dequantize().dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float32), dequantize_nf4_reference(q, torch.float32))


# --- bitsandbytes Linear4bit state dicts --------------------------------------------------------


def quantized_linear4bit(weight, bias, nested):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=nested, quant_type="nf4")
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return bnb_eager(layer.to, "cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear4bit_state_dict_loads_into_ours(nested, dtype):
    weight, bias = torch.randn(48, 70, dtype=dtype), torch.randn(48)
    theirs = quantized_linear4bit(weight, bias, nested)
    sd = theirs.state_dict()
    q = NF4Weight.from_bnb_state_dict(sd, "weight")
    expected = bnb_eager(bnb_f.dequantize_4bit, theirs.weight, theirs.weight.quant_state)
    assert q.shape == (48, 70) and q.dtype == dtype and q.nested == nested
    assert torch.equal(dequantize_nf4(q), expected)
    # ours, quantized from the same weight, writes exactly the entries bitsandbytes writes
    ours = quantize_nf4(weight, double_quant=nested).to_bnb_state_dict("weight")
    assert ours.keys() == {k for k in sd if k != "bias"}
    for key, value in ours.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key
    x = torch.randn(3, 70)
    y = nf4_linear(x, q.to("cpu"), sd["bias"])
    ref = bnb_eager(theirs, x)
    assert rel(y, ref.double()) < 1e-6


@pytest.mark.parametrize("nested", [False, True])
def test_our_state_dict_loads_into_linear4bit(nested):
    ours = quantize_nf4(torch.randn(48, 70), double_quant=nested)
    state = ours.to_bnb_state_dict("weight")
    # bitsandbytes 0.50's Linear4bit.load_state_dict rejects even its own quant-state keys; the
    # loading path bitsandbytes and transformers use for prequantized checkpoints is this one:
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    target = bnb.nn.Linear4bit(70, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    target.weight = bnb.nn.Params4bit.from_prequantized(data=state["weight"], quantized_stats=stats, requires_grad=False, device="cpu")
    x = torch.randn(4, 70)
    reference = x.double() @ dequantize_nf4_reference(ours).double().T
    assert rel(bnb_eager(target, x), reference) < 1e-6
    assert torch.equal(bnb_eager(bnb_f.dequantize_4bit, target.weight, target.weight.quant_state), dequantize_nf4(ours))


class Holder(torch.nn.Module):
    def __init__(self, q, bias):
        super().__init__()
        register_nf4_weight(self, "weight", q)
        self.bias = torch.nn.Parameter(bias, requires_grad=False)


def test_module_state_dict_in_linear4bit_format():
    weight, bias = torch.randn(40, 70), torch.randn(40)
    module = Holder(quantize_nf4(weight), bias)
    theirs = quantized_linear4bit(weight, bias, True).state_dict()
    sd = module.state_dict()
    assert sd.keys() == theirs.keys()
    assert all(torch.equal(sd[k], theirs[k]) for k in sd)
    # a module holding another weight loads the bitsandbytes entries strictly and takes them over
    other = Holder(quantize_nf4(torch.randn(40, 70), double_quant=False), torch.zeros(40))
    other.load_state_dict(theirs, strict=True)
    assert isinstance(other.weight, NF4Weight) and other.weight.nested
    assert torch.equal(other.weight.dequantize(), module.weight.dequantize())
    assert torch.equal(other.bias, bias)
    wrapped = torch.nn.Sequential(Holder(quantize_nf4(torch.randn(40, 70)), torch.zeros(40)))
    wrapped.load_state_dict({f"0.{k}": v for k, v in theirs.items()})
    assert torch.equal(wrapped[0].weight.packed, module.weight.packed)
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        other.load_state_dict({"bias": bias})


def test_state_dict_errors_name_the_problem():
    state = quantize_nf4(torch.randn(8, 64)).to_bnb_state_dict("layer.weight")
    with pytest.raises(ValueError, match="layer.weight.quant_state.bitsandbytes__nf4 missing"):
        NF4Weight.from_bnb_state_dict({k: v for k, v in state.items() if "quant_state" not in k}, "layer.weight")
    bad = dict(state)
    bad["layer.weight"] = state["layer.weight"][:-1]
    with pytest.raises(ValueError, match="ceil\\(n/2\\) = 256 bytes"):
        NF4Weight.from_bnb_state_dict(bad, "layer.weight")
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_nf4(torch.randn(8, 64), blocksize=48)
    with pytest.raises(TypeError, match="float64"):
        quantize_nf4(torch.randn(8, 64, dtype=torch.float64))


# --- fused dequant + matmul ---------------------------------------------------------------------

# fp32: exact products, fp32 sums (a wrong block scale or nibble gives > 1e-2); fp16: the output
# rounding (2^-11 relative) dominates.
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check_linear(m, n, k, dtype, nested, bias=True, lead=()):
    q = quantize_nf4(torch.randn(n, k), double_quant=nested)
    w64 = dequantize_nf4_reference(q, dtype).double()  # the weight in the compute dtype, as bitsandbytes uses it
    x = torch.randn(*lead, m, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    y = nf4_linear(x, q, b)
    ref = x.detach().double() @ w64.T + (b.detach().double() if bias else 0.0)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    assert rel(y, ref) < TOLERANCE[dtype]
    g = torch.randn(*lead, m, n, dtype=torch.float64)
    y.backward(g.to(dtype))
    assert x.grad.dtype == dtype and rel(x.grad, g @ w64) < TOLERANCE[dtype]
    if bias:
        assert rel(b.grad, g.reshape(-1, n).sum(0)) < TOLERANCE[dtype]


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nf4_linear_forward_and_grads(m, dtype):
    check_linear(m, 72, 136, dtype, nested=m != 5)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_both_paths_at_the_same_shape(monkeypatch, path):
    monkeypatch.setattr(nf4, "SMALL_M", 16 if path == "gemv" else 0)
    check_linear(5, 72, 136, torch.float32, nested=True)


@pytest.mark.parametrize("m", [3, 40])
def test_odd_row_length_and_no_bias(m):
    # K = 27: bytes straddle rows, so the tile loader takes its per-element branch
    check_linear(m, 24, 27, torch.float32, nested=True, bias=False)


def test_grouped_tile_order_over_several_groups():
    check_linear(100, 40, 48, torch.float32, nested=False, lead=())


def test_batched_input():
    check_linear(7, 24, 64, torch.float32, nested=True, lead=(2,))


def test_small_m_bf16_forward_on_the_gemv_path():
    # the GEMV path has no tl.dot, so the interpreter runs bf16 correctly
    q = quantize_nf4(torch.randn(40, 136))
    x = torch.randn(3, 136, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_nf4_reference(q, torch.bfloat16).double().T
    assert rel(nf4_matmul(x, q), ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 33, 300])
def test_nf4_linear_bf16(m):
    q = quantize_nf4(torch.randn(72, 136, device="cuda"))
    x = torch.randn(m, 136, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    b = torch.randn(72, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w64 = dequantize_nf4_reference(q, torch.bfloat16).double()
    y = nf4_linear(x, q, b)
    assert rel(y, x.detach().double() @ w64.T + b.detach().double()) < TOLERANCE[torch.bfloat16]
    g = torch.randn(m, 72, dtype=torch.float64, device="cuda")
    y.backward(g.bfloat16())
    assert rel(x.grad, g @ w64) < TOLERANCE[torch.bfloat16]
    assert rel(b.grad, g.sum(0)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_bf16_dequantize_on_gpu_matches_bitsandbytes_cpu(nested):
    w = torch.randn(130, 257, dtype=torch.bfloat16)
    packed, state = bnb_quantize(w, nested)
    q = quantize_nf4(w, double_quant=nested).to("cuda")
    assert torch.equal(dequantize_nf4(q).cpu(), bnb_dequantize(packed, state, torch.bfloat16))


@pytest.mark.parametrize("m, r", [(3, 5), (33, 5), (33, 70)])
def test_lora_epilogue(m, r):
    n, k = 40, 70
    q = quantize_nf4(torch.randn(n, k))
    x, xa, b, bias = torch.randn(m, k), torch.randn(m, r), torch.randn(n, r), torch.randn(n)
    y = nf4_matmul(x, q, bias, lora_xa=xa, lora_b=b, scaling=0.5)
    ref = x.double() @ dequantize_nf4_reference(q).double().T + bias.double() + 0.5 * xa.double() @ b.double().T
    assert rel(y, ref) < 1e-6


def test_qlora_through_lora_linear():
    from pefomed.kernels.lora import lora_linear

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


def test_input_errors_and_the_plain_cpu_fallback(monkeypatch):
    q = quantize_nf4(torch.randn(24, 40))
    with pytest.raises(ValueError, match="x has 41 features"):
        nf4_matmul(torch.randn(2, 41), q)
    with pytest.raises(ValueError, match="lora_xa and lora_b go together"):
        nf4_matmul(torch.randn(2, 40), q, lora_xa=torch.randn(2, 4))
    with pytest.raises(ValueError, match="bias has shape"):
        nf4_matmul(torch.randn(2, 40), q, torch.randn(23))
    monkeypatch.setattr(nf4, "INTERPRET", False)  # a plain CPU: no Triton
    with pytest.raises(RuntimeError, match="kernels: torch"):
        nf4_matmul(torch.randn(2, 40), q)
    w = torch.randn(24, 40)
    assert torch.equal(dequantize_nf4(quantize_nf4(w)), bnb_dequantize(*bnb_quantize(w, True), torch.float32))


# --- torch.compile ----------------------------------------------------------------------------


def test_torch_compile_traces_the_ops_without_graph_breaks():
    q = quantize_nf4(torch.randn(24, 40))
    bias = torch.randn(24, requires_grad=True)

    def step(x):
        y = nf4_linear(x, q, bias)
        return (y * nf4_dequantize(q, torch.float32).sum(1)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    compiled(x).backward()
    grad_bias = bias.grad.clone()
    bias.grad = None
    step(x_ref).backward()
    w = dequantize_nf4_reference(q).double()
    ref = x.detach().double() @ w.T + bias.detach().double()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad_bias, bias.grad, rtol=1e-6, atol=1e-6)
    assert rel(x.grad, w.sum(1).expand(3, -1) @ w) < 1e-6
    assert abs(compiled(x).detach().item() - (ref * w.sum(1)).sum().item()) < 1e-3


def test_custom_ops_pass_opcheck():
    q = quantize_nf4(torch.randn(24, 40))
    args = nf4._op_args(q)
    x = torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.pefomed.nf4_linear.default, (x, *args, torch.randn(24)))
    torch.library.opcheck(torch.ops.pefomed.nf4_dequantize.default, (*args, torch.float16))
    torch.library.opcheck(torch.ops.pefomed.nf4_matmul_t.default, (torch.randn(3, 24), *args))
