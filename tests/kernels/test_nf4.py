"""NF4 format and the dequantization kernel against bitsandbytes 0.50 (the format oracle) and the
format's definition; the matmul kernels are in test_nf4_kernels.py.

Only the tests that compare with bitsandbytes skip without it; the others check the codes against
the format's definition (`reference_dequantize`, float64 with bitsandbytes' fp32 roundings). The
kernel runs on the GPU when there is one (the inputs are moved there) and in the Triton
interpreter otherwise, with the GPU's round-to-nearest-even bf16 casts (tests/kernels/conftest.py).
Every buffer the launchers allocate is poisoned with NaN, so an element a kernel forgets to write
fails the comparison. The shapes are not multiples of the tiles, and the flattened weights have
64-blocks that straddle rows, tail blocks shorter than 64 and nested 256-blocks cut short.
"""

import copy

import pytest
import torch

from pefomed.kernels import nf4
from pefomed.kernels.nf4 import (
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dynamic_map_signed,
    nf4_dequantize,
    nf4_linear,
    to_nf4,
)

from .nf4_reference import DEVICE, heavy_tailed, reference_dequantize, rel

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
except ImportError:
    bnb = bnb_f = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="compares with bitsandbytes, the format oracle, which is not installed")

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


# --- format: bitsandbytes ----------------------------------------------------------------------


@needs_bnb
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


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_is_byte_identical_to_bitsandbytes(shape, dtype, nested):
    w = heavy_tailed(shape, dtype)
    packed, state = bnb_quantize(w, nested)
    ours = to_nf4(w, double_quant=nested)
    assert_same_quantization(ours, packed, state)
    assert isinstance(ours, NF4Tensor) and ours.shape == shape and ours.dtype == dtype


@needs_bnb
def test_nested_absmax_codes_identical_on_a_large_weight():
    # 8000 absmax values through bitsandbytes' C++ 8-bit quantizer (its 65536-bin table, not exact rounding)
    w = torch.randn(500, 1024) * torch.rand(500, 1).mul(5).exp()
    packed, state = bnb_quantize(w, True)
    assert_same_quantization(to_nf4(w), packed, state)


@needs_bnb
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_zero_blocks_like_bitsandbytes(nested):
    w = torch.randn(7, 50)
    w[:3] = 0.0  # whole zero blocks
    w[-1, -14:] = 0.0  # a zero tail block: bitsandbytes stores its absmax clamped to 1e-38
    packed, state = bnb_quantize(w, nested)
    assert_same_quantization(to_nf4(w, double_quant=nested), packed, state)
    constant = torch.full((6, 64), 0.5)  # every absmax equal: the centred absmax is all zero
    packed, state = bnb_quantize(constant, nested)
    assert_same_quantization(to_nf4(constant, double_quant=nested), packed, state)


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_is_bit_identical_to_bitsandbytes(shape, nested, out_dtype):
    w = torch.randn(shape, dtype=torch.float16) * 3
    packed, state = bnb_quantize(w, nested)
    expected = bnb_dequantize(packed, state, out_dtype)
    q = to_nf4(w, double_quant=nested)
    assert torch.equal(q.dequantize(out_dtype), expected)  # the torch path
    on_device = q.to(DEVICE)
    for got in (dequantize_nf4(on_device, out_dtype), nf4_dequantize(on_device, out_dtype)):
        assert got.dtype == expected.dtype == out_dtype and got.shape == expected.shape
        assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_bf16_dequantize_on_gpu_matches_the_definition(nested):
    q = to_nf4(torch.randn(130, 257, dtype=torch.bfloat16), double_quant=nested)
    assert torch.equal(dequantize_nf4(q.to("cuda")).cpu(), reference_dequantize(q).to(torch.bfloat16))


# --- format: its definition (no bitsandbytes needed) --------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_matches_the_format_definition(shape, nested, out_dtype):
    q = to_nf4(heavy_tailed(shape), double_quant=nested)
    expected = reference_dequantize(q).to(out_dtype)
    assert torch.equal(q.dequantize(out_dtype), expected)
    assert torch.equal(dequantize_nf4(q.to(DEVICE), out_dtype).cpu(), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_takes_the_block_absmax_and_the_nearest_code(shape):
    w = heavy_tailed(shape)
    q = to_nf4(w, double_quant=False)
    n = w.numel()
    flat = w.reshape(-1).double()
    block = torch.arange(n) // 64
    absmax = torch.zeros(q.absmax.numel(), dtype=torch.float64).scatter_reduce(0, block, flat.abs(), "amax")
    assert torch.equal(q.absmax.double(), absmax)
    byte = q.packed.reshape(-1).long()[torch.arange(n) // 2]
    code = torch.where(torch.arange(n) % 2 == 0, byte >> 4, byte & 15)
    scaled = flat / absmax[block]
    distance = (scaled[:, None] - NF4_CODE.double()[None, :]).abs()
    # nearest in exact arithmetic, up to the fp32 rounding of w / absmax the quantizer makes
    assert (distance[torch.arange(n), code] <= distance.min(dim=1).values + 1e-6).all()


def test_double_quantization_stays_close_to_the_plain_absmax():
    w = heavy_tailed((130, 257))
    plain, nested = to_nf4(w, double_quant=False), to_nf4(w)
    assert torch.equal(plain.packed, nested.packed)
    scale = nested.nested_absmax.double()[torch.arange(plain.absmax.numel()) // 256]
    err = (nested.block_absmax().double() - plain.absmax.double()).abs() / scale
    # half the widest gap of the 8-bit dynamic map (0.9 / 64 in its top decade), on the 256-block's scale
    assert err.max() < 0.0075


def test_dequantize_defaults_to_the_tensor_dtype():
    q = to_nf4(torch.randn(9, 40, dtype=torch.bfloat16))
    assert q.dequantize().dtype == torch.bfloat16
    assert torch.equal(q.dequantize(torch.float32).double(), reference_dequantize(q))


# --- bitsandbytes Linear4bit state dicts --------------------------------------------------------


def quantized_linear4bit(weight, bias, nested):
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=nested, quant_type="nf4")
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return bnb_eager(layer.to, "cpu")  # bitsandbytes quantizes on the move to a device


@needs_bnb
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear4bit_state_dict_loads_into_ours(nested, dtype):
    weight, bias = torch.randn(48, 70, dtype=dtype), torch.randn(48)
    theirs = quantized_linear4bit(weight, bias, nested)
    sd = theirs.state_dict()
    q = NF4Tensor.from_bnb_state_dict(sd, "weight")
    expected = bnb_eager(bnb_f.dequantize_4bit, theirs.weight, theirs.weight.quant_state)
    assert q.shape == (48, 70) and q.dtype == dtype and q.nested == nested
    assert torch.equal(q.dequantize(), expected)
    # ours, quantized from the same weight, writes exactly the entries bitsandbytes writes
    ours = to_nf4(weight, double_quant=nested).to_bnb_state_dict("weight")
    assert ours.keys() == {k for k in sd if k != "bias"}
    for key, value in ours.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key
    x = torch.randn(3, 70)
    y = nf4_linear(x.to(DEVICE), q.to(DEVICE), sd["bias"].to(DEVICE))
    ref = bnb_eager(theirs, x)
    assert rel(y, ref.double()) < 1e-6


@needs_bnb
@pytest.mark.parametrize("nested", [False, True])
def test_our_state_dict_loads_into_linear4bit(nested):
    ours = to_nf4(torch.randn(48, 70), double_quant=nested)
    state = ours.to_bnb_state_dict("weight")
    # bitsandbytes 0.50's Linear4bit.load_state_dict rejects even its own quant-state keys; the
    # loading path bitsandbytes and transformers use for prequantized checkpoints is this one:
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    target = bnb.nn.Linear4bit(70, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    target.weight = bnb.nn.Params4bit.from_prequantized(data=state["weight"], quantized_stats=stats, requires_grad=False, device="cpu")
    x = torch.randn(4, 70)
    reference = x.double() @ reference_dequantize(ours).T
    assert rel(bnb_eager(target, x), reference) < 1e-6
    assert torch.equal(bnb_eager(bnb_f.dequantize_4bit, target.weight, target.weight.quant_state), ours.dequantize())


class Holder(torch.nn.Module):
    def __init__(self, q, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(q, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False)


@needs_bnb
def test_module_state_dict_converts_to_and_from_linear4bit():
    weight, bias = torch.randn(40, 70), torch.randn(40)
    module = Holder(to_nf4(weight), bias)
    theirs = quantized_linear4bit(weight, bias, True).state_dict()
    sd = module.state_dict()
    assert sd.keys() == {"weight", "bias"} and isinstance(sd["weight"], NF4Tensor)
    converted = {**sd["weight"].to_bnb_state_dict("weight"), "bias": sd["bias"]}
    assert converted.keys() == theirs.keys()
    assert all(torch.equal(converted[k], theirs[k]) for k in theirs)
    # a bitsandbytes checkpoint loads strictly into a module built with to_nf4's defaults
    other = Holder(to_nf4(torch.randn(40, 70)), torch.zeros(40))
    other.load_state_dict({"weight": NF4Tensor.from_bnb_state_dict(theirs, "weight"), "bias": theirs["bias"]})
    assert isinstance(other.weight, NF4Tensor) and torch.equal(other.weight.packed, module.weight.packed)
    assert torch.equal(other.weight.dequantize(), module.weight.dequantize()) and torch.equal(other.bias, bias)
    # another layout (no double quantization) is assigned, not copied into the nested codes
    plain = NF4Tensor.from_bnb_state_dict(quantized_linear4bit(weight, None, False).state_dict(), "weight")
    with pytest.raises(RuntimeError, match="assign=True"):
        other.load_state_dict({"weight": plain, "bias": bias})
    other.load_state_dict({"weight": plain, "bias": bias}, assign=True)
    assert not other.weight.nested and not other.weight.requires_grad
    assert torch.equal(other.weight.dequantize(), bnb_dequantize(*bnb_quantize(weight, False), torch.float32))


@pytest.mark.parametrize("nested", [False, True])
def test_bnb_state_dict_round_trip(nested):
    q = to_nf4(heavy_tailed((33, 70), torch.float16), double_quant=nested)
    back = NF4Tensor.from_bnb_state_dict(q.to_bnb_state_dict("layer.weight"), "layer.weight")
    assert back.shape == q.shape and back.dtype == q.dtype and back.nested == nested
    assert torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(back.dequantize(torch.float32).double(), reference_dequantize(q))


def test_state_dict_errors_name_the_problem():
    state = to_nf4(torch.randn(8, 64)).to_bnb_state_dict("layer.weight")
    with pytest.raises(ValueError, match="layer.weight.quant_state.bitsandbytes__nf4 missing"):
        NF4Tensor.from_bnb_state_dict({k: v for k, v in state.items() if "quant_state" not in k}, "layer.weight")
    bad = dict(state)
    bad["layer.weight"] = state["layer.weight"][:-1]
    with pytest.raises(ValueError, match="ceil\\(n/2\\) = 256 bytes"):
        NF4Tensor.from_bnb_state_dict(bad, "layer.weight")
    with pytest.raises(ValueError, match="blocksize 48"):
        to_nf4(torch.randn(8, 64), blocksize=48)
    with pytest.raises(TypeError, match="float64"):
        to_nf4(torch.randn(8, 64, dtype=torch.float64))
