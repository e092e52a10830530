"""Kernel benchmarks against the baselines a user would otherwise run, side by side in one process.

    python -m pefomed.bench.kernels [--only lora,nf4,proj] [--out bench/results/kernels-<device>-<date>.json]
    python -m pefomed.bench.kernels --smoke [--out k.json]   # tiny shapes on CPU: proves the harness runs

Nothing is timed before it is checked: every case's callable (ours and every baseline) is run
once and its outputs and gradients are compared with a float64 reference of the same math on the
same inputs (the NF4 dequantization bit for bit with the plain PyTorch dequantizer). A case that
fails is recorded as WRONG with the error, is not timed, and any target that needs it reads
"FAIL (wrong output)": a wrong kernel cannot PASS.

The engine's dtypes: bf16 activations and frozen weights, fp32 trained parameters (LoRA A/B, the
projection's weight and bias), uint8 NF4 codes with double quantization (the smoke run on CPU uses
fp32 activations: the interpreter's bf16 is not the GPU's).

Every case records the median, p20 and p80 time (`triton.testing.do_bench`, quantiles
[0.5, 0.2, 0.8]; on the CPU smoke run `time.perf_counter`), the achieved TFLOP/s and GB/s and
their share of the ceilings measured in the same run (a large bf16 `torch.mm` for FLOP/s, a large
device-to-device copy for bandwidth), the peak memory of one call (absolute and above what was
allocated before), and the ratio to its baseline:

- lora: `kernels.lora.lora_linear` (r 8/16/64, dropout 0.05, fp32 adapters) fwd+bwd vs the frozen
  base `F.linear` fwd + dX, and vs PEFT's `peft.tuners.lora.Linear` fwd+bwd (dX, dA, dB) with the
  same fp32 adapters; hidden 4096 -> 4096 / 11008 / 14336, M = 1 ... 8192.
- nf4: `dequantize_nf4` vs bitsandbytes' `dequantize_4bit`; `nf4_linear` vs bf16 `F.linear`
  (cuBLAS), bitsandbytes' `matmul_4bit` (its gemv_4bit at M = 1, dequantize + GEMM above) and
  "dequantize_nf4 + F.linear" (dequantize into a buffer, then cuBLAS).
- proj: `grouped_projection` placing EVA-g tokens (B x 1025 x 1408 -> B*256 x 5632 -> 4096) into
  the text embeddings at their rows, vs the eager connector writing the same rows
  (`view + F.linear + index_copy_` into the same buffer) and vs a bare GEMM of the same size on
  pre-grouped contiguous input with pre-cast weights; batch 1, 8 (the engine's) and 16; forward,
  and fwd+bwd (dW, db).

The targets are printed as PASS / MISS / FAIL (wrong output) / not measured; nothing here asserts.
The JSON holds the device name, torch/triton versions, date and exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from pefomed.errors import run_cli

log = logging.getLogger("pefomed.bench.kernels")  # also under `python -m`, where __name__ is __main__

LLM_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336)]  # (in, out)
M_VALUES = [1, 16, 64, 512, 4096, 8192]
RANKS = [8, 16, 64]
PROJ_BATCHES = [1, 8, 16]
ENGINE_PROJ_BATCH = 8  # the engine's projection batch: the target is read there
EVA_G = {"tokens": 1025, "width": 1408, "out_dim": 4096, "text": 128}
LORA_DROPOUT = 0.05
LORA_SEED = 1234  # a fixed dropout seed, so the checked output is the timed one
SUITES = ("lora", "nf4", "proj")
# relative Frobenius error vs float64 that a correct result stays under (bf16 rounds inputs,
# weights and outputs at 2^-8; an error of the kernel's own is >= 1e-1)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}

Timer = Callable[[Callable[[], object]], tuple[float, float, float]]


# --- measurement -----------------------------------------------------------------------------


def make_timer(device: str) -> Timer:
    """(median, p20, p80) in milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench

        def measure(fn):
            q50, q20, q80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return q50, q20, q80

        return measure

    def measure_cpu(fn, reps: int = 3):
        fn()  # the first call pays the interpreter's and the allocator's warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[len(times) // 2], times[0], times[-1]

    return measure_cpu


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak bytes of one call: absolute, and above what was allocated before it."""
    if device != "cuda":
        return {"peak_bytes": None, "peak_extra_bytes": None}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "peak_extra_bytes": peak - before}


def measure_ceilings(device: str, measure: Timer) -> dict:
    """The device's own bf16 GEMM FLOP/s and copy bandwidth, measured now."""
    if device != "cuda":
        return {"tflops": None, "gbps": None, "note": "CPU smoke run: no ceilings"}
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm_ms, _, _ = measure(lambda: torch.mm(a, b))
    src = torch.empty(1 << 30, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms, _, _ = measure(lambda: dst.copy_(src))
    return {
        "tflops": 2 * size**3 / mm_ms / 1e9,
        "gbps": 2 * (1 << 30) / copy_ms / 1e6,  # read + write
        "how": f"bf16 torch.mm {size}^3; device-to-device copy of 1 GiB (read + write)",
    }


# --- checking --------------------------------------------------------------------------------

Outputs = torch.Tensor | Sequence[torch.Tensor | None]


def _as_tuple(x: Outputs) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def compare(got: Outputs, want: Outputs, tol: float) -> str | None:
    """None when every tensor of `got` is within `tol` (relative Frobenius) of `want`, else why not.

    tol = 0 asks for bit equality. NaN / inf anywhere in `got` is an error.
    """
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if (g is None) != (w is None):
            return f"output {i}: {'missing' if g is None else 'unexpected'}"
        if g is None:
            continue
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i}: shape {list(g.shape)}, expected {list(w.shape)}"
        if not torch.isfinite(g).all():
            return f"output {i}: non-finite values"
        if tol == 0:
            if not torch.equal(g, w.to(g.dtype)):
                return f"output {i}: not bit-identical ({int((g != w.to(g.dtype)).sum())} elements differ)"
            continue
        g64, w64 = g.double(), w.double()
        err = ((g64 - w64).norm() / w64.norm().clamp_min(1e-30)).item()
        if err > tol:
            return f"output {i}: relative error {err:.3g} > {tol:g}"
    return None


def fwd_bwd(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor) -> Callable[[], tuple]:
    """Forward and backward in one call, returning (y, *grads) so that both are checked; grads are
    returned, not accumulated into .grad (no extra add per timed call)."""

    def run() -> tuple:
        y = forward()
        return (y.detach(), *torch.autograd.grad(y, inputs, dy))

    return run


def reference_fwd_bwd(forward64: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], dy: torch.Tensor) -> tuple:
    """float64 (y, *grads) of `forward64(*inputs64)`, the inputs' values promoted exactly."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    y = forward64(*inputs64)
    return (y.detach(), *torch.autograd.grad(y, inputs64, dy.double()))


class Bench:
    """Checks a case, then times it, fills in its throughput and ceiling shares, and collects the rows."""

    def __init__(self, device: str, measure: Timer, ceilings: dict) -> None:
        self.device, self.measure, self.ceilings = device, measure, ceilings
        self.rows: list[dict] = []

    def case(self, suite: str, name: str, shape: Sequence[int], fn: Callable[[], Outputs], *,
             reference: Callable[[], Outputs], tol: float, flops: float = 0, nbytes: float = 0,
             baseline: dict | None = None, before_check: Callable[[], None] | None = None,
             after_check: Callable[[], None] | None = None) -> dict:  # fmt: skip
        """`fn` is run once and compared with `reference()` (within `tol`), then timed if right."""
        row: dict = {"suite": suite, "case": name, "shape": list(shape)}
        try:
            if before_check is not None:
                before_check()
            problem = compare(fn(), reference(), tol)
        except Exception as e:  # a crash is a wrong result too, not a crashed benchmark run
            problem = f"raised {type(e).__name__}: {e}"
        finally:
            if after_check is not None:
                after_check()
        if problem is not None:
            row |= {"check": f"WRONG: {problem}", "note": "not timed: wrong output"}
            log.warning("%s %s %s: %s", suite, name, list(shape), row["check"])
            self.rows.append(row)
            return row
        ms, q20, q80 = self.measure(fn)
        row |= {"check": "ok", "median_ms": ms, "p20_ms": q20, "p80_ms": q80,
                "tflops": flops / ms / 1e9 if flops else None, "gbps": nbytes / ms / 1e6 if nbytes else None,
                **peak_memory(fn, self.device)}  # fmt: skip
        if self.ceilings.get("tflops") and row["tflops"]:
            row["pct_flop_ceiling"] = 100 * row["tflops"] / self.ceilings["tflops"]
        if self.ceilings.get("gbps") and row["gbps"]:
            row["pct_bw_ceiling"] = 100 * row["gbps"] / self.ceilings["gbps"]
        if baseline is not None and "median_ms" in baseline:
            row["baseline"] = baseline["case"]
            row["ratio_to_baseline"] = ms / baseline["median_ms"]
        self.rows.append(row)
        return row

    def note(self, suite: str, name: str, shape: Sequence[int], note: str) -> dict:
        row = {"suite": suite, "case": name, "shape": list(shape), "note": note}
        self.rows.append(row)
        return row


def _ratio(a: dict, b: dict, key: str = "median_ms") -> float | None:
    """b / a when both were timed (a speedup of a over b)."""
    if key in a and key in b:
        return b[key] / a[key]
    return None


# --- lora ------------------------------------------------------------------------------------


def _peft_layer(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """PEFT's LoRA Linear around the frozen weight with our adapters (fp32), or None without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    n, k = weight.shape
    r = lora_a.shape[0]
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.weight.requires_grad_(False)
    alpha = scaling * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=LORA_DROPOUT)
    layer = PeftLinear(base, "default", config, r=r, lora_alpha=alpha, lora_dropout=LORA_DROPOUT)
    layer.to(device=weight.device).train()
    with torch.no_grad():  # the same adapters, in fp32 as the engine trains them
        layer.lora_A["default"].weight.data = lora_a.detach().clone()
        layer.lora_B["default"].weight.data = lora_b.detach().clone()
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.requires_grad_(True)
    return layer


def bench_lora(bench: Bench, dtype: torch.dtype, shapes, m_values, ranks) -> None:
    for k, n in shapes:
        weight = torch.randn(n, k, device=bench.device, dtype=dtype) / k**0.5
        for m in m_values:
            _lora_cases(bench, weight, m, ranks)


def _lora_cases(bench: Bench, weight: torch.Tensor, m: int, ranks) -> None:
    """The frozen base, then ours and PEFT's for each rank, on one [m, k] x [n, k] shape."""
    from pefomed.kernels.lora import lora_linear, lora_linear_reference

    n, k = weight.shape
    device, dtype, size = weight.device, weight.dtype, weight.dtype.itemsize
    tol = TOL[dtype]
    scaling = 2.0
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    base_flops = 2 * 2 * m * n * k  # y = x W^T and dX = dY W
    base_bytes = size * (2 * n * k + 2 * m * k + 2 * m * n)
    base = bench.case(
        "lora", "frozen F.linear fwd+dX", [m, k, n], fwd_bwd(lambda: F.linear(x, weight), [x], dy),
        reference=lambda: reference_fwd_bwd(lambda x64: F.linear(x64, weight.double()), [x], dy),
        tol=tol, flops=base_flops, nbytes=base_bytes,
    )  # fmt: skip
    for r in ranks:
        # fp32 adapters, as engine/build.py keeps the trained parameters
        lora_a = (torch.randn(r, k, device=device) / k**0.5).requires_grad_()
        lora_b = (torch.randn(n, r, device=device) * 0.01).requires_grad_()
        flops = base_flops + 3 * 2 * m * r * (k + n)  # the forward, dA / dB and dX rank-r products
        nbytes = base_bytes + 4 * 2 * r * (k + n)
        name = f"r={r} p={LORA_DROPOUT} fwd+bwd"

        def ours(a: torch.Tensor = lora_a, b: torch.Tensor = lora_b) -> torch.Tensor:
            return lora_linear(x, weight, a, b, scaling, dropout_p=LORA_DROPOUT, training=True, seed=LORA_SEED)

        def ours64(x64, a64, b64):  # the kernel's own mask (same seed), applied in float64
            return lora_linear_reference(x64, weight.double(), a64, b64, scaling, None, LORA_DROPOUT, True, seed=LORA_SEED)

        row = bench.case(
            "lora", f"lora_linear {name}", [m, k, n], fwd_bwd(ours, [x, lora_a, lora_b], dy),
            reference=lambda a=lora_a, b=lora_b, f=ours64: reference_fwd_bwd(f, [x, a, b], dy),
            tol=tol, flops=flops, nbytes=nbytes, baseline=base,
        )  # fmt: skip
        if device.type == "cuda":
            # Both base-GEMM routes, so that the `auto` rule (cuBLAS on sm_90+, Triton on sm_8x)
            # is checked against measurements on the GPU at hand.
            for route in ("triton", "cublas"):
                def routed(a: torch.Tensor = lora_a, b: torch.Tensor = lora_b, route: str = route) -> torch.Tensor:
                    return lora_linear(x, weight, a, b, scaling, dropout_p=LORA_DROPOUT, training=True,
                                       seed=LORA_SEED, base_gemm=route)

                bench.case(
                    "lora", f"lora_linear[{route}] {name}", [m, k, n], fwd_bwd(routed, [x, lora_a, lora_b], dy),
                    reference=lambda a=lora_a, b=lora_b, f=ours64: reference_fwd_bwd(f, [x, a, b], dy),
                    tol=tol, flops=flops, nbytes=nbytes, baseline=base,
                )  # fmt: skip
        layer = _peft_layer(weight, lora_a, lora_b, scaling)
        if layer is None:
            bench.note("lora", f"PEFT lora.Linear {name}", [m, k, n], "peft unavailable")
            continue
        dropout = layer.lora_dropout["default"]

        def no_dropout64(x64, a64, b64):  # PEFT is checked with its dropout off (its mask is random)
            return lora_linear_reference(x64, weight.double(), a64, b64, scaling, None, 0.0, False)

        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        theirs = bench.case(
            "lora", f"PEFT lora.Linear {name}", [m, k, n], fwd_bwd(lambda layer=layer: layer(x), params, dy),
            reference=lambda p=params: reference_fwd_bwd(no_dropout64, p, dy), tol=tol,
            before_check=dropout.eval, after_check=dropout.train,
            flops=flops, nbytes=nbytes, baseline=base,
        )  # fmt: skip
        speed = _ratio(row, theirs)
        if speed is not None:
            row["speedup_vs_peft"] = speed
        if row.get("peak_extra_bytes") is not None and theirs.get("peak_extra_bytes") is not None:
            row["peak_extra_vs_peft"] = row["peak_extra_bytes"] / max(theirs["peak_extra_bytes"], 1)


# --- nf4 -------------------------------------------------------------------------------------


def _bitsandbytes():
    """(bitsandbytes, bitsandbytes.functional), or None when it does not import here."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except Exception:  # noqa: BLE001 (a missing CUDA library raises more than ImportError)
        return None
    return bitsandbytes, bnb_functional


def bench_nf4(bench: Bench, dtype: torch.dtype, shapes, m_values) -> None:
    bnb = _bitsandbytes()
    for k, n in shapes:
        _nf4_cases(bench, torch.randn(n, k, device=bench.device, dtype=dtype), m_values, bnb)


def _nf4_cases(bench: Bench, weight: torch.Tensor, m_values, bnb) -> None:
    """Dequantization vs bitsandbytes, then the NF4 matmul vs the dense one and bitsandbytes' for each M."""
    from pefomed.kernels.nf4 import clear_dequant_cache, dequantize_nf4, nf4_linear, to_nf4

    n, k = weight.shape
    dtype = weight.dtype
    q = to_nf4(weight)
    w_deq = q.dequantize(dtype)  # plain PyTorch (the `kernels: torch` path), not the kernel under test
    w_deq64 = w_deq.double()
    packed_bytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size()
    dequant_bytes = packed_bytes + weight.numel() * weight.element_size()
    state = packed = None
    baseline = None
    if bnb is None:
        bench.note("nf4", "bitsandbytes dequantize_4bit", [n, k], "bitsandbytes unavailable")
    else:
        packed, state = bnb[1].quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        baseline = bench.case(
            "nf4", "bitsandbytes dequantize_4bit", [n, k], lambda: bnb[1].dequantize_4bit(packed, state),
            reference=lambda: w_deq, tol=TOL[dtype], nbytes=dequant_bytes,
        )  # fmt: skip
    row = bench.case(
        "nf4", "dequantize_nf4", [n, k], lambda: dequantize_nf4(q), reference=lambda: w_deq, tol=0,
        nbytes=dequant_bytes, baseline=baseline,
    )  # fmt: skip
    if baseline is not None and _ratio(row, baseline) is not None:
        row["speedup_vs_bitsandbytes"] = _ratio(row, baseline)
    dense_name = f"{str(dtype).removeprefix('torch.')} F.linear"
    for m in m_values:
        x = torch.randn(m, k, device=weight.device, dtype=dtype)
        flops = 2 * m * n * k
        io = (m * k + m * n) * dtype.itemsize

        def ref_q(x=x):
            return x.double() @ w_deq64.T

        dense = bench.case(
            "nf4", dense_name, [m, k, n], lambda x=x: F.linear(x, weight),
            reference=lambda x=x: x.double() @ weight.double().T, tol=TOL[dtype],
            flops=flops, nbytes=io + weight.numel() * weight.element_size(),
        )  # fmt: skip
        def ours(x=x):
            # Each call pays the dequantization a step's next layer would: the one-weight cache
            # that lets a backward reuse its forward's dequantized weight is emptied first.
            clear_dequant_cache(keep_buffers=True)
            return nf4_linear(x, q)

        row = bench.case(
            "nf4", "nf4_linear", [m, k, n], ours, reference=ref_q, tol=TOL[dtype],
            flops=flops, nbytes=io + packed_bytes, baseline=dense,
        )  # fmt: skip
        if _ratio(row, dense) is not None:
            row["speedup_vs_dense"] = _ratio(row, dense)
        staged = bench.case(
            "nf4", "dequantize_nf4 + F.linear", [m, k, n], lambda x=x: F.linear(x, dequantize_nf4(q)),
            reference=ref_q, tol=TOL[dtype], flops=flops, nbytes=io + packed_bytes + 2 * weight.numel() * weight.element_size(),
            baseline=dense,
        )  # fmt: skip
        if _ratio(row, staged) is not None:
            row["speedup_vs_dequant_gemm"] = _ratio(row, staged)
        if bnb is None:
            bench.note("nf4", "bitsandbytes matmul_4bit", [m, k, n], "bitsandbytes unavailable")
            continue
        theirs = bench.case(
            "nf4", "bitsandbytes matmul_4bit", [m, k, n],
            lambda x=x: bnb[0].matmul_4bit(x, packed.t(), quant_state=state),
            reference=ref_q, tol=TOL[dtype], flops=flops, nbytes=io + packed_bytes, baseline=dense,
        )  # fmt: skip
        if _ratio(row, theirs) is not None:
            row["speedup_vs_bitsandbytes"] = _ratio(row, theirs)


# --- proj ------------------------------------------------------------------------------------


def bench_proj(bench: Bench, dtype: torch.dtype, batches, tokens: int, width: int, out_dim: int, text: int) -> None:
    for b in batches:
        _proj_cases(bench, dtype, b, tokens, width, out_dim, text)


def _proj_cases(bench: Bench, dtype: torch.dtype, b: int, tokens: int, width: int, out_dim: int, text: int) -> None:
    """EVA-g tokens grouped by 4, projected, and written into the text embeddings at their rows."""
    from pefomed.kernels.visual_proj import grouped_projection

    device = bench.device
    tol = TOL[dtype]
    n_img = (tokens - 1) // 4
    feats = torch.randn(b, tokens, width, device=device, dtype=dtype)
    # the trained projection in fp32, as engine/build.py keeps it
    weight = (torch.randn(out_dim, 4 * width, device=device) / (4 * width) ** 0.5).requires_grad_()
    bias = (torch.randn(out_dim, device=device) * 0.1).requires_grad_()
    seq = text + n_img
    # the image rows sit after the first text token of each sequence
    row_index = (torch.arange(b, device=device)[:, None] * seq + 1 + torch.arange(n_img, device=device)).reshape(-1)
    embeds = torch.randn(b * seq, out_dim, device=device, dtype=dtype)  # what the embedding lookup wrote
    grouped = feats[:, 1:].reshape(b * n_img, 4 * width).contiguous()
    w_cast, b_cast = weight.detach().to(dtype), bias.detach().to(dtype)
    shape = [b, tokens, width, out_dim]
    flops = 2 * b * n_img * 4 * width * out_dim
    io = dtype.itemsize * (b * n_img * 4 * width + b * n_img * out_dim) + 4 * out_dim * 4 * width

    def placed64(weight64, bias64):
        image = F.linear(feats[:, 1:].reshape(b * n_img, 4 * width).double(), weight64, bias64)
        return embeds.double().index_copy(0, row_index, image)

    def image_eager() -> torch.Tensor:
        # the eager connector: group by view, project with the weight cast to the features' dtype
        return F.linear(feats[:, 1:].reshape(b * n_img, 4 * width), weight.to(dtype), bias.to(dtype))

    buf_eager, buf_ours = embeds.clone(), embeds.clone()
    with torch.no_grad():
        bare = bench.case(
            "proj", "bare GEMM (pre-grouped, contiguous, pre-cast)", shape, lambda: F.linear(grouped, w_cast, b_cast),
            reference=lambda: F.linear(grouped.double(), w_cast.double(), b_cast.double()), tol=tol, flops=flops, nbytes=io,
        )  # fmt: skip
        # both write the same image rows of the same embeddings buffer; the text rows stay
        eager_row = bench.case(
            "proj", "eager view+linear+index_copy_ (same rows)", shape,
            lambda: buf_eager.index_copy_(0, row_index, image_eager()),
            reference=lambda: placed64(weight.detach().double(), bias.detach().double()), tol=tol,
            flops=flops, nbytes=io, baseline=bare,
        )  # fmt: skip
        row = bench.case(
            "proj", "grouped_projection + placement", shape,
            lambda: grouped_projection(feats, weight, bias, out=buf_ours, row_index=row_index),
            reference=lambda: placed64(weight.detach().double(), bias.detach().double()), tol=tol,
            flops=flops, nbytes=io, baseline=bare,
        )  # fmt: skip
    if _ratio(row, eager_row) is not None:
        row["speedup_vs_eager"] = _ratio(row, eager_row)

    # Training: the embeddings are a fresh activation each step (the lookup's output), so both
    # start from a copy of them; the eager one writes out of place (index_copy), ours in place.
    dy = torch.randn(b * seq, out_dim, device=device, dtype=dtype)
    ref_train = lambda: reference_fwd_bwd(placed64, [weight, bias], dy)  # noqa: E731
    eager_train = bench.case(
        "proj", "eager view+linear+index_copy fwd+bwd(dW, db)", shape,
        fwd_bwd(lambda: embeds.clone().index_copy(0, row_index, image_eager()), [weight, bias], dy),
        reference=ref_train, tol=tol, flops=3 * flops, nbytes=2 * io,
    )  # fmt: skip
    train = bench.case(
        "proj", "grouped_projection + placement fwd+bwd(dW, db)", shape,
        fwd_bwd(lambda: grouped_projection(feats, weight, bias, out=embeds.clone(), row_index=row_index), [weight, bias], dy),
        reference=ref_train, tol=tol, flops=3 * flops, nbytes=2 * io, baseline=eager_train,
    )  # fmt: skip
    if _ratio(train, eager_train) is not None:
        train["speedup_vs_eager"] = _ratio(train, eager_train)


# --- targets ---------------------------------------------------------------------------------


def _target(name: str, row: dict | None, value: float | None, ok: bool, unit: str = "") -> dict:
    if row is not None and row.get("check", "ok") != "ok":
        status = "FAIL (wrong output)"
    elif value is None:
        status = "not measured"
    else:
        status = "PASS" if ok else "MISS"
    return {"target": name, "value": value, "unit": unit, "status": status}


def evaluate_targets(rows: list[dict], ceilings: dict) -> list[dict]:
    """The GPU targets (bf16, H100) as PASS / MISS / FAIL (wrong output) / not measured; never assertions."""

    def find(case: str, shape: list[int]) -> dict | None:
        return next((r for r in rows if r["case"] == case and r["shape"] == shape), None)

    def wrong(*candidates: dict | None) -> dict | None:
        return next((r for r in candidates if r is not None and r.get("check", "ok") != "ok"), None)

    out = []
    shape = [8192, 4096, 4096]
    name = f"r=64 p={LORA_DROPOUT} fwd+bwd"
    lora, peft, base = find(f"lora_linear {name}", shape), find(f"PEFT lora.Linear {name}", shape), find("frozen F.linear fwd+dX", shape)
    ratio = lora.get("ratio_to_baseline") if lora else None
    out.append(_target("LoRA fwd+bwd (M=8192, 4096x4096, r=64, p=0.05) <= 1.10x frozen base fwd + dX",
                       wrong(lora, base), ratio, ratio is not None and ratio <= 1.10, "x"))  # fmt: skip
    speed = lora.get("speedup_vs_peft") if lora else None
    out.append(_target("LoRA >= 1.15x faster than PEFT lora.Linear (same case)", wrong(lora, peft), speed,
                       speed is not None and speed >= 1.15, "x"))  # fmt: skip
    memory = lora.get("peak_extra_vs_peft") if lora else None
    out.append(_target("LoRA peak memory below PEFT's (same case)", wrong(lora, peft), memory,
                       memory is not None and memory < 1.0, "x PEFT"))  # fmt: skip

    deq, deq_bnb = find("dequantize_nf4", [4096, 4096]), find("bitsandbytes dequantize_4bit", [4096, 4096])
    speed = deq.get("speedup_vs_bitsandbytes") if deq else None
    out.append(_target("NF4 dequant 4096x4096 >= 1.2x bitsandbytes dequantize_4bit", wrong(deq, deq_bnb), speed,
                       speed is not None and speed >= 1.2, "x"))  # fmt: skip
    share = deq.get("pct_bw_ceiling") if deq else None
    out.append(_target("NF4 dequant 4096x4096 >= 70% of copy bandwidth", wrong(deq), share, share is not None and share >= 70, "%"))

    for m in (1, 16):
        shape = [m, 4096, 4096]
        ours, dense, bnb = find("nf4_linear", shape), find("bfloat16 F.linear", shape), find("bitsandbytes matmul_4bit", shape)
        speed = ours.get("speedup_vs_dense") if ours else None
        out.append(_target(f"NF4 linear M={m} (4096x4096) >= 2.5x faster than bf16 F.linear", wrong(ours, dense), speed,
                           speed is not None and speed >= 2.5, "x"))  # fmt: skip
        speed = ours.get("speedup_vs_bitsandbytes") if ours else None
        out.append(_target(f"NF4 linear M={m} (4096x4096) >= 1.2x bitsandbytes matmul_4bit", wrong(ours, bnb), speed,
                           speed is not None and speed >= 1.2, "x"))  # fmt: skip
    shape = [8192, 4096, 4096]
    ours, dense = find("nf4_linear", shape), find("bfloat16 F.linear", shape)
    ratio = ours.get("ratio_to_baseline") if ours else None
    out.append(_target("NF4 linear M=8192 (4096x4096) <= 1.10x bf16 F.linear", wrong(ours, dense), ratio,
                       ratio is not None and ratio <= 1.10, "x"))  # fmt: skip

    shape = [ENGINE_PROJ_BATCH, EVA_G["tokens"], EVA_G["width"], EVA_G["out_dim"]]
    proj, bare = find("grouped_projection + placement", shape), find("bare GEMM (pre-grouped, contiguous, pre-cast)", shape)
    ratio = proj.get("ratio_to_baseline") if proj else None
    out.append(_target(f"grouped projection + placement B={ENGINE_PROJ_BATCH} <= 1.05x a bare GEMM of the same size",
                       wrong(proj, bare), ratio, ratio is not None and ratio <= 1.05, "x"))  # fmt: skip
    return out


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], targets: list[dict]) -> None:
    print(f"{'case':50s} {'shape':24s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
          f"{'peak MiB':>9s} {'ratio':>7s}")  # fmt: skip
    for r in rows:
        if "median_ms" not in r:
            print(f"{r['case']:50s} {r['shape']!s:24s} {r.get('check', r['note'])}")
            continue
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        print(f"{r['case']:50s} {r['shape']!s:24s} {r['median_ms']:10.4f} {r['p20_ms']:9.4f} {r['p80_ms']:9.4f} "
              f"{_fmt(r['tflops'], '8.2f')} {_fmt(r['gbps'], '8.1f')} {_fmt(peak, '9.1f')} "
              f"{_fmt(r.get('ratio_to_baseline'), '7.3f')}")  # fmt: skip
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"
        print(f"[{t['status']}] {t['target']}: {value}")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated subset of lora,nf4,proj")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (harness check; times mean nothing)")
    parser.add_argument("--out", help="JSON path, e.g. bench/results/kernels-<device>-<date>.json")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SUITES))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: choose from {','.join(SUITES)}")
    if args.smoke:
        device = "cpu"
        # The kernels run in Triton's interpreter; it must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        parser.error("the benchmarks need a CUDA device; --smoke checks the harness on CPU")

    # The interpreter's bf16 is not the GPU's (it truncates and multiplies raw bits): the CPU
    # smoke run checks the harness in fp32.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    measure = make_timer(device)
    ceilings = measure_ceilings(device, measure)
    bench = Bench(device, measure, ceilings)
    if args.smoke:
        shapes, m_values, ranks, batches = [(40, 24)], [5], [4], [2]
        proj_shape = {"tokens": 17, "width": 8, "out_dim": 24, "text": 3}
    else:
        shapes, m_values, ranks, batches, proj_shape = LLM_SHAPES, M_VALUES, RANKS, PROJ_BATCHES, EVA_G
    if "lora" in only:
        bench_lora(bench, dtype, shapes, m_values, ranks)
    if "nf4" in only:
        bench_nf4(bench, dtype, shapes, m_values)
    if "proj" in only:
        bench_proj(bench, dtype, batches, **proj_shape)

    import triton

    command = "python -m pefomed.bench.kernels " + shlex.join(sys.argv[1:] if argv is None else argv)
    targets = evaluate_targets(bench.rows, ceilings)
    result = {
        "device": _device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": command.strip(),
        "smoke": args.smoke,
        "dtype": str(dtype).removeprefix("torch."),
        "timing": "triton.testing.do_bench quantiles [0.5, 0.2, 0.8]" if device == "cuda" else "time.perf_counter, 3 runs",
        "ceilings": ceilings,
        "rows": bench.rows,
        "targets": targets,
    }
    print_table(bench.rows, targets)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
