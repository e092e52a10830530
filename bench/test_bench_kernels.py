"""The kernel cases of `python -m pefomed.bench.kernels` as pytest-benchmark cases.

Each kernel is timed beside the baseline a user would otherwise run (the frozen `F.linear`,
PEFT's `lora.Linear`, bitsandbytes' `dequantize_4bit`, the eager grouped projection), in the same
group, so `--benchmark-compare` shows a regression of either. Full shapes need CUDA; `--bench-size
smoke` runs tiny shapes on the CPU through the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pefomed.bench import kernels as kbench

FULL_LORA = [(16, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 14336, 16)]  # (M, K, N, r)
SMOKE_LORA = [(5, 40, 24, 4)]
FULL_NF4 = [(1, 4096, 4096), (8192, 4096, 4096)]  # (M, K, N)
SMOKE_NF4 = [(5, 40, 24)]
FULL_PROJ = [(4, kbench.EVA_G)]
SMOKE_PROJ = [(1, {"tokens": 17, "width": 8, "out_dim": 24, "text": 3})]


@pytest.fixture(autouse=True)
def _shapes_need_cuda(bench_size):
    if bench_size == "full" and not torch.cuda.is_available():
        pytest.skip("the kernels' full shapes need a CUDA GPU; --bench-size smoke runs them in the interpreter")


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _run(benchmark, fn, bench_size):
    if bench_size == "smoke":
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    return benchmark(fn)


def pytest_generate_tests(metafunc):
    smoke = metafunc.config.getoption("--bench-size") == "smoke"
    if "lora_shape" in metafunc.fixturenames:
        metafunc.parametrize("lora_shape", SMOKE_LORA if smoke else FULL_LORA, ids=str)
    if "nf4_shape" in metafunc.fixturenames:
        metafunc.parametrize("nf4_shape", SMOKE_NF4 if smoke else FULL_NF4, ids=str)
    if "proj_shape" in metafunc.fixturenames:
        metafunc.parametrize("proj_shape", SMOKE_PROJ if smoke else FULL_PROJ, ids=lambda s: str(s[0]))


@pytest.mark.parametrize("impl", ["frozen F.linear", "lora_linear", "PEFT lora.Linear"])
def test_lora(benchmark, lora_shape, impl, device, bench_size, synchronized):
    from pefomed.kernels.lora import lora_linear

    m, k, n, r = lora_shape
    dtype = _dtype(device)
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    a = (torch.randn(r, k, device=device, dtype=dtype, generator=g) / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device=device, dtype=dtype, generator=g) * 0.01).requires_grad_()
    if impl == "frozen F.linear":
        fn = kbench.fwd_bwd(lambda: F.linear(x, weight), [x], dy)
    elif impl == "lora_linear":
        fn = kbench.fwd_bwd(lambda: lora_linear(x, weight, a, b, 2.0, dropout_p=kbench.LORA_DROPOUT), [x, a, b], dy)
    else:
        layer = kbench._peft_layer(weight, a, b, 2.0)
        if layer is None:
            pytest.skip("peft is not installed")
        fn = kbench.fwd_bwd(lambda: layer(x), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight], dy)
    benchmark.group = f"lora M={m} {k}x{n} r={r}"
    benchmark.extra_info.update(impl=impl, shape=[m, k, n], r=r, dropout=kbench.LORA_DROPOUT, dtype=str(dtype))
    _run(benchmark, synchronized(fn), bench_size)


@pytest.mark.parametrize("impl", ["dequantize_nf4", "bitsandbytes dequantize_4bit"])
def test_nf4_dequantize(benchmark, nf4_shape, impl, device, bench_size, synchronized):
    from pefomed.kernels.nf4 import dequantize_nf4, to_nf4

    _, k, n = nf4_shape
    weight = torch.randn(n, k, device=device, dtype=_dtype(device))
    if impl == "dequantize_nf4":
        q = to_nf4(weight)
        fn = lambda: dequantize_nf4(q)  # noqa: E731
    else:
        found = kbench._bitsandbytes()
        if found is None:
            pytest.skip("bitsandbytes does not import here")
        bnb = found[1]
        packed, state = bnb.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda: bnb.dequantize_4bit(packed, state)  # noqa: E731
    benchmark.group = f"nf4 dequantize {n}x{k}"
    benchmark.extra_info.update(impl=impl, shape=[n, k])
    _run(benchmark, synchronized(fn), bench_size)


@pytest.mark.parametrize("impl", ["dense F.linear", "nf4_linear"])
def test_nf4_linear(benchmark, nf4_shape, impl, device, bench_size, synchronized):
    from pefomed.kernels.nf4 import nf4_linear, to_nf4

    m, k, n = nf4_shape
    dtype = _dtype(device)
    weight = torch.randn(n, k, device=device, dtype=dtype)
    x = torch.randn(m, k, device=device, dtype=dtype)
    if impl == "nf4_linear":
        q = to_nf4(weight)
        fn = lambda: nf4_linear(x, q)  # noqa: E731
    else:
        fn = lambda: F.linear(x, weight)  # noqa: E731
    benchmark.group = f"nf4 linear M={m} {k}x{n}"
    benchmark.extra_info.update(impl=impl, shape=[m, k, n], dtype=str(dtype))
    _run(benchmark, synchronized(fn), bench_size)


@pytest.mark.parametrize("impl", ["eager view+linear+cat", "grouped_projection + placement"])
def test_grouped_projection(benchmark, proj_shape, impl, device, bench_size, synchronized):
    from pefomed.kernels.visual_proj import grouped_projection

    b, s = proj_shape
    dtype = _dtype(device)
    tokens, width, out_dim, text = s["tokens"], s["width"], s["out_dim"], s["text"]
    n_img = (tokens - 1) // 4
    feats = torch.randn(b, tokens, width, device=device, dtype=dtype)
    weight = (torch.randn(out_dim, 4 * width, device=device, dtype=dtype) / (4 * width) ** 0.5).requires_grad_()
    bias = torch.zeros(out_dim, device=device, dtype=dtype, requires_grad=True)
    text_embeds = torch.randn(b, text, out_dim, device=device, dtype=dtype)
    seq = text + n_img
    rows = (torch.arange(b, device=device)[:, None] * seq + 1 + torch.arange(n_img, device=device)).reshape(-1)
    buffer = torch.empty(b * seq, out_dim, device=device, dtype=dtype)
    dy = torch.randn(b * seq, out_dim, device=device, dtype=dtype)

    def eager():
        image = F.linear(feats[:, 1:].reshape(b, n_img, 4 * width), weight, bias)
        return torch.cat([text_embeds[:, :1], image, text_embeds[:, 1:]], dim=1).reshape(b * seq, out_dim)

    def ours():
        return grouped_projection(feats, weight, bias, out=buffer.detach(), row_index=rows)

    fn = kbench.fwd_bwd(eager if impl.startswith("eager") else ours, [weight, bias], dy)
    benchmark.group = f"projection fwd+bwd B={b} {tokens}x{width}->{out_dim}"
    benchmark.extra_info.update(impl=impl, shape=[b, tokens, width, out_dim], dtype=str(dtype))
    _run(benchmark, synchronized(fn), bench_size)
