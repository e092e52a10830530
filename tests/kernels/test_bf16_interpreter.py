"""The bf16 interpreter patch (tests/kernels/bf16_interpreter.py) against torch's bf16 on the CPU.

torch's `.to(torch.bfloat16)` from float32 rounds to nearest even and keeps subnormals, inf and
NaN, as the GPU's `cvt.rn.bf16.f32` does; bf16 -> float32 is exact; torch's CPU bf16 elementwise
ops compute in float32 and round once. Each test runs real Triton kernels in the interpreter
(the fixture is autouse in tests/kernels/conftest.py) and compares bit patterns where the
semantics are exact, and errors against float64 where they are not (dot accumulation order).
"""

import os

import numpy as np
import pytest
import torch

from .bf16_interpreter import (
    bf16_bits_to_f32,
    bf16_semantics,
    f32_to_bf16_bits,
    f64_to_bf16_bits,
    installed,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="tests the Triton interpreter (no GPU here)"
)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that any NaN equals any NaN (payloads are not specified)."""
    a32, b32 = a.float(), b.float()
    nan = torch.isnan(a32)
    return bool(torch.equal(nan, torch.isnan(b32)) and torch.equal(bits_of(a)[~nan], bits_of(b)[~nan]))


def interesting_f32(n_random: int = 20000) -> torch.Tensor:
    """Ties (even and odd lsb, both signs), just above/below ties, subnormals, the overflow
    boundary, +-0, +-inf, NaNs with payload only in the dropped half, and random bit patterns."""
    g = torch.Generator().manual_seed(1)
    rand_bits = torch.randint(0, 2**32, (n_random,), generator=g, dtype=torch.int64)
    hi = torch.randint(0, 2**16, (4000,), generator=g, dtype=torch.int64) << 16
    special_lo = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    structured = (hi[:, None] | special_lo[None, :]).reshape(-1)
    edges = torch.tensor(
        [
            0x00000000, 0x80000000,  # +-0
            0x00000001, 0x00008000, 0x00018000, 0x00010000, 0x007FFFFF, 0x807F8000,  # subnormals, ties
            0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,  # overflow to inf at RNE
            0x7F800000, 0xFF800000,  # inf
            0x7F800001, 0x7FC00000, 0xFF800001, 0x7F8000FF, 0x7FFFFFFF,  # NaNs (payload in low half)
            0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties to even around 1.0
        ],
        dtype=torch.int64,
    )
    bits = torch.cat([edges, structured, rand_bits])
    return _as_f32(bits)


def _as_f32(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy((bits.numpy() & 0xFFFFFFFF).astype(np.uint32).view(np.float32).copy())


# --- the numpy conversions the patch uses ---


def test_bf16_to_f32_is_exact_for_every_bit_pattern():
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ours = torch.from_numpy(bf16_bits_to_f32(every.view(torch.int16).numpy().view(np.uint16)))
    ref = every.float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def test_f32_to_bf16_rounds_to_nearest_even_like_torch():
    x = interesting_f32()
    ours = torch.from_numpy(f32_to_bf16_bits(x.numpy()).view(np.int16)).view(torch.bfloat16)
    assert same_values(ours, x.to(torch.bfloat16))


def test_f32_to_bf16_rtz_truncates():
    x = interesting_f32()
    ours = torch.from_numpy(f32_to_bf16_bits(x.numpy(), "rtz").view(np.int16)).view(torch.bfloat16)
    finite = torch.isfinite(x)
    trunc = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(bits_of(ours)[finite], bits_of(trunc)[finite])
    assert torch.equal(torch.isnan(ours.float()), torch.isnan(x))


def exact_bf16_round(x: np.ndarray) -> np.ndarray:
    """float64 -> bf16 value rounded once to nearest even, by comparing with both neighbours."""
    out = np.empty_like(x)
    for i, v in enumerate(x):
        if not np.isfinite(v) or v == 0:
            out[i] = v
            continue
        # bf16 neighbours: truncate the float64 to 8 significand bits (7 stored) at its exponent,
        # or at the smallest normal's exponent for subnormals.
        e = max(np.frexp(abs(v))[1] - 1, -126)
        ulp = 2.0 ** (e - 7)
        lo = np.floor(abs(v) / ulp) * ulp
        hi = lo + ulp
        d_lo, d_hi = abs(v) - lo, hi - abs(v)
        pick = lo if d_lo < d_hi else hi if d_hi < d_lo else (lo if (lo / ulp) % 2 == 0 else hi)
        out[i] = np.copysign(pick if pick < 2.0**128 - 2.0**119 else np.inf, v)
    return out


def test_f64_to_bf16_rounds_once():
    g = np.random.default_rng(2)
    one, next_ = 1.0, 1.0 + 2**-7
    mid = (one + next_) / 2
    # Just above a bf16 tie by far less than a float32 ulp: float32 rounding lands exactly on the
    # tie and the second rounding goes to even (1.0); the single rounding gives 1.0078125.
    x = np.array(
        [mid + 2**-40, mid - 2**-40, -(mid + 2**-40), mid, 1.0 + 3 * 2**-8, 2.0**-133 * 1.5 + 2.0**-170,
         1e-45, 3.3961e38, 3.3963e38, np.inf, -np.inf, 0.0, -0.0]
        + list(g.standard_normal(2000) * np.exp(g.uniform(-100, 100, 2000)))
    )
    ours = bf16_bits_to_f32(f64_to_bf16_bits(x)).astype(np.float64)
    assert ours[0] == next_ and ours[1] == one and ours[2] == -next_ and ours[3] == one
    assert np.array_equal(ours, exact_bf16_round(x))
    # torch goes through float32 (double rounding): the case above is where it differs.
    assert torch.tensor(x[:1]).to(torch.bfloat16).item() == one


def test_patch_installs_nests_and_restores():
    from triton.runtime import interpreter

    assert installed()  # the autouse fixture
    before = interpreter.InterpreterBuilder.create_dot
    with bf16_semantics():
        assert interpreter.InterpreterBuilder.create_dot is before
    assert installed() and interpreter.InterpreterBuilder.create_dot is before


# --- kernels ---


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def run_dot(a, b, out_dtype):
    M, K = a.shape
    N = b.shape[1]
    c = torch.full((M, N), float("nan"), dtype=out_dtype)
    _dot_kernel[(triton.cdiv(M, 16), triton.cdiv(N, 16))](a, b, c, M, N, K, BM=16, BN=16, BK=32)
    return c


def test_bf16_dot_multiplies_values_in_fp32():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(19, 45, generator=g).to(torch.bfloat16)
    b = torch.randn(45, 23, generator=g).to(torch.bfloat16)
    ref = a.double() @ b.double()
    c = run_dot(a, b, torch.float32)
    # fp32 products of bf16 are exact; only the fp32 accumulation rounds.
    bound = 45 * 2**-24 * (a.double().abs() @ b.double().abs())
    assert ((c.double() - ref).abs() <= bound).all()
    # Exact products show on integer-valued operands: every sum is exact in fp32.
    ai = torch.randint(-100, 100, (19, 45), generator=g).to(torch.bfloat16)
    bi = torch.randint(-100, 100, (45, 23), generator=g).to(torch.bfloat16)
    assert torch.equal(run_dot(ai, bi, torch.float32), (ai.double() @ bi.double()).float())


def test_bf16_dot_large_k_accumulates_in_fp32():
    """K = 4096: fp32 accumulation stays within K * 2^-24 of float64; a bf16 accumulator (the
    precision bug the fixture must expose) would be off by ~1e-2 relative."""
    g = torch.Generator().manual_seed(4)
    K = 4096
    a = (torch.rand(16, K, generator=g) + 0.5).to(torch.bfloat16)  # positive: no cancellation
    b = (torch.rand(K, 16, generator=g) + 0.5).to(torch.bfloat16)
    ref = a.double() @ b.double()
    c = _run_large_k(a, b)
    rel = ((c.double() - ref).abs() / ref).max().item()
    assert rel < 4e-6, rel
    # the same sum with a bf16 running accumulator, to show the bound separates the two
    acc = torch.zeros(16, 16, dtype=torch.bfloat16)
    for k0 in range(0, K, 64):
        acc = (acc.float() + a[:, k0:k0 + 64].float() @ b[k0:k0 + 64].float()).to(torch.bfloat16)
    assert ((acc.double() - ref).abs() / ref).max().item() > 100 * rel


def _run_large_k(a, b):
    M, K = a.shape
    c = torch.full((M, b.shape[1]), float("nan"))
    _dot_kernel[(1, 1)](a, b, c, M, b.shape[1], K, BM=16, BN=16, BK=64)
    return c


def test_bf16_dot_of_specials_follows_ieee():
    a = torch.tensor([[float("inf"), 1.0], [float("nan"), 1.0], [1e-40, 1e38], [-0.0, 0.0]]).to(torch.bfloat16)
    b = torch.tensor([[1.0, 0.0], [1.0, 2.0]]).to(torch.bfloat16)
    c = run_dot(a, b, torch.float32)
    ref = a.float() @ b.float()
    assert torch.equal(torch.isnan(c), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(c[ok], ref[ok])
    assert c[2, 0].item() == pytest.approx(1e38, rel=1e-2)  # a subnormal-sized term does not break it


def test_bf16_dot_stored_as_bf16_rounds_to_nearest_even():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    b = torch.randn(32, 16, generator=g).to(torch.bfloat16)
    c32 = run_dot(a, b, torch.float32)
    c16 = run_dot(a, b, torch.bfloat16)
    assert same_values(c16, c32.to(torch.bfloat16))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if MODE == "store":  # implicit cast by the store
        tl.store(y_ptr + offs, x, mask=mask)
    elif MODE == "rtz":
        tl.store(y_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=mask)
    else:
        tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


def cast(x, dtype, mode="to"):
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), MODE=mode, BLOCK=1024)
    return y


@pytest.mark.parametrize("mode", ["store", "to"])
def test_f32_to_bf16_in_kernel_matches_torch(mode):
    x = interesting_f32(4000)
    assert same_values(cast(x, torch.bfloat16, mode), x.to(torch.bfloat16))


def test_f32_to_bf16_rtz_in_kernel_truncates():
    x = interesting_f32(4000)
    y = cast(x, torch.bfloat16, "rtz")
    finite = torch.isfinite(x)
    assert torch.equal(bits_of(y)[finite], ((x.view(torch.int32) >> 16) & 0xFFFF)[finite])


def test_bf16_to_wider_and_int_in_kernel():
    every = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert same_values_wide(cast(every, dtype), every.to(dtype))
    finite = every[torch.isfinite(every.float()) & (every.float().abs() < 2**31)]
    assert torch.equal(cast(finite, torch.int32), finite.float().to(torch.int32))


def same_values_wide(a, b):
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan]))


def test_f64_fp16_int_to_bf16_in_kernel_round_once():
    g = np.random.default_rng(6)
    mid = 1.0 + 2**-8
    x64 = torch.tensor([mid + 2**-40, mid - 2**-40, 1e-300, -3.0] + list(g.standard_normal(500) * 1e3))
    assert torch.equal(
        cast(x64, torch.bfloat16).double(), torch.from_numpy(exact_bf16_round(x64.numpy()))
    )
    x16 = torch.randn(1000, dtype=torch.float16)
    assert same_values(cast(x16, torch.bfloat16), x16.to(torch.bfloat16))
    xi = torch.tensor([0, 1, -1, 255, 257, 2**24 + 1, 2**31 - 1, -(2**31), 0x01818000, 123457], dtype=torch.int32)
    assert torch.equal(cast(xi, torch.bfloat16).double(), torch.from_numpy(exact_bf16_round(xi.double().numpy())))


@triton.jit
def _arith_kernel(x_ptr, y_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    if OP == "add":
        r = x + y
    elif OP == "sub":
        r = x - y
    elif OP == "mul":
        r = x * y
    elif OP == "div":
        r = x / y
    elif OP == "neg":
        r = -x
    elif OP == "max":
        r = tl.maximum(x, y)
    elif OP == "min":
        r = tl.minimum(x, y)
    elif OP == "fma":
        r = tl.fma(x, y, x)
    elif OP == "scale":
        r = x * 3.0
    elif OP == "lt":
        r = x < y
    elif OP == "eq":
        r = x == y
    elif OP == "abs":
        r = tl.abs(x)
    else:  # "where"
        r = tl.where(x > y, x, y)
    tl.store(out_ptr + offs, r, mask=mask)


TORCH_OP = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": lambda x, y: (x.float() / y.float()),  # Triton promotes / to fp32
    "neg": lambda x, y: -x,
    "max": torch.maximum,
    "min": torch.minimum,
    "fma": lambda x, y: (x.float() * y.float() + x.float()).to(torch.bfloat16),
    "scale": lambda x, y: x * 3.0,
    "lt": torch.lt,
    "eq": torch.eq,
    "abs": lambda x, y: x.abs(),
    "where": lambda x, y: torch.where(x > y, x, y),
}


@pytest.mark.parametrize("op", sorted(TORCH_OP))
def test_bf16_elementwise_matches_torch(op):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3000, generator=g) * torch.exp(torch.randn(3000, generator=g) * 4)).to(torch.bfloat16)
    y = (torch.randn(3000, generator=g) * torch.exp(torch.randn(3000, generator=g) * 4)).to(torch.bfloat16)
    y[:50] = x[:50]  # equal operands for ==, max, min
    y[50:60] = -x[50:60]
    ref = TORCH_OP[op](x, y)
    out = torch.empty(ref.shape, dtype=ref.dtype)
    _arith_kernel[(triton.cdiv(3000, 1024),)](x, y, out, 3000, OP=op, BLOCK=1024)
    if ref.dtype == torch.bool:
        assert torch.equal(out, ref)
    elif ref.dtype == torch.float32:
        assert torch.equal(out, ref)
    else:
        assert same_values(out, ref)


@triton.jit
def _reduce_kernel(x_ptr, out_ptr, N: tl.constexpr, OP: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    if OP == "sum":
        r = tl.sum(x, axis=0)
    elif OP == "sum32":
        r = tl.sum(x.to(tl.float32), axis=0)
    elif OP == "max":
        r = tl.max(x, axis=0)
    else:
        r = tl.min(x, axis=0)
    tl.store(out_ptr, r)


def reduce(x, op, dtype):
    out = torch.empty(1, dtype=dtype)
    _reduce_kernel[(1,)](x, out, N=x.numel(), OP=op)
    return out[0]


def test_bf16_reductions_use_values():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(256, generator=g).to(torch.bfloat16)
    assert reduce(x, "max", torch.bfloat16).item() == x.max().item()
    assert reduce(x, "min", torch.bfloat16).item() == x.min().item()  # negative: bit patterns would lie
    ints = torch.randint(-20, 20, (256,), generator=g).to(torch.bfloat16)
    assert reduce(ints, "sum", torch.bfloat16).item() == ints.double().sum().item()  # exact
    exact = x.double().sum().item()
    s32 = reduce(x, "sum32", torch.float32).item()
    assert abs(s32 - exact) <= 256 * 2**-24 * x.double().abs().sum().item()
    # a bf16 sum rounds at each of its log2(256) = 8 tree levels
    s16 = reduce(x, "sum", torch.bfloat16).item()
    assert abs(s16 - exact) <= 8 * 2**-8 * x.double().abs().sum().item()
    # 1 + 255 * 2^-9: added one at a time to a bf16 running sum, every 2^-9 is below half an ulp
    # of 1 and is lost (result 1.0); a tree adds the small ones to each other first and loses
    # only the two that meet the 1 early, as the GPU's reduction tree does.
    small = torch.tensor([1.0] + [2**-9] * 255).to(torch.bfloat16)
    assert reduce(small, "sum", torch.bfloat16).item() == pytest.approx(1.0 + 255 * 2**-9, abs=2**-7)
