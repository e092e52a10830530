"""Kernel benchmarks against the baselines a user would otherwise run, side by side in one process.

    python -m pefomed.bench.kernels [--only lora,nf4,proj] [--out bench/results/kernels-<device>-<date>.json]
    python -m pefomed.bench.kernels --smoke [--out k.json]   # tiny shapes on CPU: proves the harness runs

Every case records the median, p20 and p80 time (`triton.testing.do_bench`, quantiles
[0.5, 0.2, 0.8]; on the CPU smoke run `time.perf_counter`), the achieved TFLOP/s and GB/s and
their share of the ceilings measured in the same run (a large bf16 `torch.mm` for FLOP/s, a large
device-to-device copy for bandwidth), the peak memory of one call (`torch.cuda.max_memory_allocated`,
absolute and above what was allocated before), and the ratio to its baseline:

- lora: `kernels.lora.lora_linear` (r 8/16/64, dropout 0.05) fwd+bwd vs the frozen base
  `F.linear` fwd+bwd (dX only) and vs PEFT's `peft.tuners.lora.Linear` fwd+bwd (dX, dA, dB);
  hidden 4096 -> 4096 / 11008 / 14336, M = 1 ... 8192.
- nf4: `kernels.nf4.dequantize_nf4` vs `bitsandbytes.functional.dequantize_4bit` (a row that says
  "bitsandbytes unavailable" when it does not import with CUDA); `nf4_linear` vs bf16 `F.linear`.
- proj: `kernels.visual_proj.grouped_projection` placing EVA-g tokens (B x 1025 x 1408 ->
  B*256 x 5632 -> 4096) into a text sequence vs the eager `view + F.linear + torch.cat`, and vs
  a bare GEMM of the same size on pre-grouped contiguous input; forward, and fwd+bwd (dW, db).

The targets are printed as PASS / MISS (or "not measured" when their case did not run); nothing
here asserts. The JSON holds the device name, torch/triton versions, date and exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

LLM_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336)]  # (in, out)
M_VALUES = [1, 16, 64, 512, 4096, 8192]
RANKS = [8, 16, 64]
PROJ_BATCHES = [1, 4, 16]
EVA_G = {"tokens": 1025, "width": 1408, "out_dim": 4096, "text": 128}
LORA_DROPOUT = 0.05
SUITES = ("lora", "nf4", "proj")

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


class Bench:
    """Times a case, fills in its throughput and ceiling shares, and collects the rows."""

    def __init__(self, device: str, measure: Timer, ceilings: dict) -> None:
        self.device, self.measure, self.ceilings = device, measure, ceilings
        self.rows: list[dict] = []

    def case(self, suite: str, name: str, shape: Sequence[int], fn: Callable[[], object], *, flops: float = 0,
             nbytes: float = 0, baseline: dict | None = None) -> dict:  # fmt: skip
        ms, q20, q80 = self.measure(fn)
        row = {"suite": suite, "case": name, "shape": list(shape), "median_ms": ms, "p20_ms": q20, "p80_ms": q80,
               "tflops": flops / ms / 1e9 if flops else None, "gbps": nbytes / ms / 1e6 if nbytes else None,
               **peak_memory(fn, self.device)}  # fmt: skip
        if self.ceilings.get("tflops") and row["tflops"]:
            row["pct_flop_ceiling"] = 100 * row["tflops"] / self.ceilings["tflops"]
        if self.ceilings.get("gbps") and row["gbps"]:
            row["pct_bw_ceiling"] = 100 * row["gbps"] / self.ceilings["gbps"]
        if baseline is not None:
            row["baseline"] = baseline["case"]
            row["ratio_to_baseline"] = ms / baseline["median_ms"]
        self.rows.append(row)
        return row

    def note(self, suite: str, name: str, shape: Sequence[int], note: str) -> dict:
        row = {"suite": suite, "case": name, "shape": list(shape), "note": note}
        self.rows.append(row)
        return row


def grads_of(outputs: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    """A backward that returns the grads instead of accumulating into .grad (no extra add per call)."""
    return lambda: torch.autograd.grad(outputs(), inputs, grad)


# --- suites ----------------------------------------------------------------------------------


def _peft_layer(k: int, n: int, r: int, weight: torch.Tensor):
    """PEFT's LoRA Linear around a frozen nn.Linear, or None when peft does not import."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    base.weight.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=LORA_DROPOUT)
    layer = PeftLinear(base, "default", config, r=r, lora_alpha=2 * r, lora_dropout=LORA_DROPOUT)
    layer.to(device=weight.device, dtype=weight.dtype).train()
    with torch.no_grad():  # PEFT initialises B to zero; a non-zero B is the realistic mid-training case
        layer.lora_B["default"].weight.normal_(0, 0.01)
    return layer


def bench_lora(bench: Bench, dtype: torch.dtype, shapes, m_values, ranks) -> None:
    for k, n in shapes:
        weight = torch.randn(n, k, device=bench.device, dtype=dtype) / k**0.5
        for m in m_values:
            _lora_cases(bench, weight, m, ranks)


def _lora_cases(bench: Bench, weight: torch.Tensor, m: int, ranks) -> None:
    """The frozen base, then ours and PEFT's for each rank, on one [m, k] x [n, k] shape."""
    from pefomed.kernels.lora import lora_linear

    n, k = weight.shape
    dtype, size = weight.dtype, weight.dtype.itemsize
    x = torch.randn(m, k, device=weight.device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=weight.device, dtype=dtype)
    base_flops = 2 * 2 * m * n * k  # y = x W^T and dX = dY W
    base_bytes = size * (2 * n * k + 2 * m * k + 2 * m * n)
    base = bench.case("lora", "frozen F.linear fwd+bwd(dX)", [m, k, n], grads_of(lambda: F.linear(x, weight), [x], dy),
                      flops=base_flops, nbytes=base_bytes)  # fmt: skip
    for r in ranks:
        lora_a = (torch.randn(r, k, device=weight.device, dtype=dtype) / k**0.5).requires_grad_()
        lora_b = (torch.randn(n, r, device=weight.device, dtype=dtype) * 0.01).requires_grad_()
        flops = base_flops + 3 * 2 * m * r * (k + n)  # the forward, dA / dB and dX rank-r products
        nbytes = base_bytes + size * 2 * r * (k + n)

        def ours(a: torch.Tensor = lora_a, b: torch.Tensor = lora_b) -> torch.Tensor:
            return lora_linear(x, weight, a, b, 2.0, dropout_p=LORA_DROPOUT, training=True)

        name = f"r={r} p={LORA_DROPOUT} fwd+bwd"
        row = bench.case("lora", f"lora_linear {name}", [m, k, n], grads_of(ours, [x, lora_a, lora_b], dy),
                         flops=flops, nbytes=nbytes, baseline=base)  # fmt: skip
        layer = _peft_layer(k, n, r, weight)
        if layer is None:
            bench.note("lora", f"PEFT lora.Linear {name}", [m, k, n], "peft unavailable")
            continue
        params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        theirs = bench.case("lora", f"PEFT lora.Linear {name}", [m, k, n],
                            grads_of(lambda layer=layer: layer(x), params, dy), flops=flops, nbytes=nbytes, baseline=base)  # fmt: skip
        row["speedup_vs_peft"] = theirs["median_ms"] / row["median_ms"]
        if row["peak_extra_bytes"] is not None:
            row["peak_extra_vs_peft"] = row["peak_extra_bytes"] / max(theirs["peak_extra_bytes"], 1)


def _bitsandbytes_functional(device: str):
    if device != "cuda":
        return None
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:  # noqa: BLE001 (a missing CUDA library raises more than ImportError)
        return None
    return bnb_functional


def bench_nf4(bench: Bench, dtype: torch.dtype, shapes, m_values) -> None:
    bnb_functional = _bitsandbytes_functional(bench.device)
    for k, n in shapes:
        _nf4_cases(bench, torch.randn(n, k, device=bench.device, dtype=dtype), m_values, bnb_functional)


def _nf4_cases(bench: Bench, weight: torch.Tensor, m_values, bnb_functional) -> None:
    """Dequantization vs bitsandbytes, then the fused NF4 matmul vs the dense one for each M."""
    from pefomed.kernels.nf4 import dequantize_nf4, nf4_linear, to_nf4

    n, k = weight.shape
    q = to_nf4(weight)
    packed_bytes = q.packed.numel() + q.absmax.numel() * q.absmax.element_size()
    dequant_bytes = packed_bytes + weight.numel() * weight.element_size()
    baseline = None
    if bnb_functional is None:
        bench.note("nf4", "bitsandbytes dequantize_4bit", [n, k], "bitsandbytes unavailable (needs CUDA)")
    else:
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        baseline = bench.case("nf4", "bitsandbytes dequantize_4bit", [n, k],
                              lambda: bnb_functional.dequantize_4bit(packed, state), nbytes=dequant_bytes)  # fmt: skip
    row = bench.case("nf4", "dequantize_nf4", [n, k], lambda: dequantize_nf4(q), nbytes=dequant_bytes, baseline=baseline)
    if baseline is not None:
        row["speedup_vs_bitsandbytes"] = baseline["median_ms"] / row["median_ms"]
    dense_name = f"{str(weight.dtype).removeprefix('torch.')} F.linear"
    for m in m_values:
        x = torch.randn(m, k, device=weight.device, dtype=weight.dtype)
        flops = 2 * m * n * k
        io = (m * k + m * n) * weight.dtype.itemsize
        dense = bench.case("nf4", dense_name, [m, k, n], lambda x=x: F.linear(x, weight), flops=flops,
                           nbytes=io + weight.numel() * weight.element_size())  # fmt: skip
        row = bench.case("nf4", "nf4_linear", [m, k, n], lambda x=x: nf4_linear(x, q), flops=flops,
                         nbytes=io + packed_bytes, baseline=dense)  # fmt: skip
        row["speedup_vs_dense"] = dense["median_ms"] / row["median_ms"]


def bench_proj(bench: Bench, dtype: torch.dtype, batches, tokens: int, width: int, out_dim: int, text: int) -> None:
    for b in batches:
        _proj_cases(bench, dtype, b, tokens, width, out_dim, text)


def _proj_cases(bench: Bench, dtype: torch.dtype, b: int, tokens: int, width: int, out_dim: int, text: int) -> None:
    """EVA-g tokens grouped by 4, projected, and placed after the first text token of each sequence."""
    from pefomed.kernels.visual_proj import grouped_projection

    device = bench.device
    n_img = (tokens - 1) // 4
    feats = torch.randn(b, tokens, width, device=device, dtype=dtype)
    weight = (torch.randn(out_dim, 4 * width, device=device, dtype=dtype) / (4 * width) ** 0.5).requires_grad_()
    bias = torch.zeros(out_dim, device=device, dtype=dtype, requires_grad=True)
    text_embeds = torch.randn(b, text, out_dim, device=device, dtype=dtype)
    seq = text + n_img
    row_index = (torch.arange(b, device=device)[:, None] * seq + 1 + torch.arange(n_img, device=device)).reshape(-1)
    grouped = feats[:, 1:].reshape(b * n_img, 4 * width).contiguous()
    buffer = torch.empty(b * seq, out_dim, device=device, dtype=dtype)
    shape = [b, tokens, width, out_dim]
    flops = 2 * b * n_img * 4 * width * out_dim
    io = dtype.itemsize * (b * n_img * 4 * width + out_dim * 4 * width + b * n_img * out_dim)

    def eager() -> torch.Tensor:
        image = F.linear(feats[:, 1:].reshape(b, n_img, 4 * width), weight, bias)
        return torch.cat([text_embeds[:, :1], image, text_embeds[:, 1:]], dim=1).reshape(b * seq, out_dim)

    def ours() -> torch.Tensor:
        # The text rows are already in the buffer (the embedding lookup wrote them); only images land
        # here. A fresh detached alias per call keeps repeated in-place calls from chaining graphs.
        return grouped_projection(feats, weight, bias, out=buffer.detach(), row_index=row_index)

    with torch.no_grad():
        bare = bench.case("proj", "bare GEMM (pre-grouped, contiguous)", shape,
                          lambda: F.linear(grouped, weight, bias), flops=flops, nbytes=io)  # fmt: skip
        eager_row = bench.case("proj", "eager view+linear+cat", shape, eager, flops=flops, nbytes=io, baseline=bare)
        row = bench.case("proj", "grouped_projection + placement", shape, ours, flops=flops, nbytes=io, baseline=bare)
    row["speedup_vs_eager"] = eager_row["median_ms"] / row["median_ms"]

    dy = torch.randn(b * seq, out_dim, device=device, dtype=dtype)
    eager_train = bench.case("proj", "eager view+linear+cat fwd+bwd(dW, db)", shape, grads_of(eager, [weight, bias], dy),
                             flops=2 * flops, nbytes=2 * io)  # fmt: skip
    train = bench.case("proj", "grouped_projection + placement fwd+bwd(dW, db)", shape, grads_of(ours, [weight, bias], dy),
                       flops=2 * flops, nbytes=2 * io, baseline=eager_train)  # fmt: skip
    train["speedup_vs_eager"] = eager_train["median_ms"] / train["median_ms"]


# --- targets ---------------------------------------------------------------------------------


def _target(name: str, value: float | None, ok: bool | None, unit: str = "") -> dict:
    status = "not measured" if value is None else ("PASS" if ok else "MISS")
    return {"target": name, "value": value, "unit": unit, "status": status}


def evaluate_targets(rows: list[dict], ceilings: dict) -> list[dict]:
    """The GPU targets as PASS / MISS / not measured; never assertions."""

    def find(case: str, shape: list[int]) -> dict | None:
        return next((r for r in rows if r["case"] == case and r["shape"] == shape and "median_ms" in r), None)

    out = []
    lora = find(f"lora_linear r=64 p={LORA_DROPOUT} fwd+bwd", [8192, 4096, 4096])
    ratio = lora["ratio_to_baseline"] if lora else None
    out.append(_target("LoRA fwd+bwd (M=8192, 4096x4096, r=64, p=0.05) <= 1.10x frozen base fwd+bwd(dX)",
                       ratio, ratio is not None and ratio <= 1.10, "x"))  # fmt: skip
    speed = lora.get("speedup_vs_peft") if lora else None
    out.append(_target("LoRA >= 1.3x faster than PEFT (same case)", speed, speed is not None and speed >= 1.3, "x"))
    memory = lora.get("peak_extra_vs_peft") if lora else None
    out.append(_target("LoRA peak memory below PEFT's (same case)", memory, memory is not None and memory < 1.0, "x PEFT"))

    dequants = [r for r in rows if r["case"] == "dequantize_nf4" and "median_ms" in r]
    for r in dequants:
        speed = r.get("speedup_vs_bitsandbytes")
        out.append(_target(f"NF4 dequant {r['shape']} >= 1.5x bitsandbytes", speed, speed is not None and speed >= 1.5, "x"))
        share = r.get("pct_bw_ceiling")
        out.append(_target(f"NF4 dequant {r['shape']} >= 80% of copy bandwidth", share, share is not None and share >= 80, "%"))
    if not dequants:
        out.append(_target("NF4 dequant >= 1.5x bitsandbytes and >= 80% of copy bandwidth", None, None))

    matmuls = [r for r in rows if r["case"] == "nf4_linear" and r["shape"][0] in (1, 16, 8192)]
    for r in matmuls:
        m = r["shape"][0]
        if m <= 16:
            speed = r["speedup_vs_dense"]
            out.append(_target(f"NF4 matmul {r['shape']} >= 2.5x faster than bf16 F.linear", speed, speed >= 2.5, "x"))
        else:
            ratio = r["ratio_to_baseline"]
            out.append(_target(f"NF4 matmul {r['shape']} <= 1.15x bf16 F.linear", ratio, ratio <= 1.15, "x"))
    if not matmuls:
        out.append(_target("NF4 matmul M<=16 >= 2.5x and M=8192 <= 1.15x bf16 F.linear", None, None))

    projections = [r for r in rows if r["case"] == "grouped_projection + placement" and r["shape"][1:] == [1025, 1408, 4096]]
    for r in projections:
        speed, ratio = r["speedup_vs_eager"], r["ratio_to_baseline"]
        out.append(_target(f"projection + placement B={r['shape'][0]} >= 1.3x eager", speed, speed >= 1.3, "x"))
        out.append(_target(f"projection + placement B={r['shape'][0]} <= 1.05x bare GEMM", ratio, ratio <= 1.05, "x"))
    if not projections:
        out.append(_target("projection + placement >= 1.3x eager and <= 1.05x bare GEMM", None, None))
    return out


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], targets: list[dict]) -> None:
    print(f"{'case':48s} {'shape':24s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
          f"{'peak MiB':>9s} {'ratio':>7s}")  # fmt: skip
    for r in rows:
        if "median_ms" not in r:
            print(f"{r['case']:48s} {r['shape']!s:24s} {r['note']}")
            continue
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        print(f"{r['case']:48s} {r['shape']!s:24s} {r['median_ms']:10.4f} {r['p20_ms']:9.4f} {r['p80_ms']:9.4f} "
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

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    measure = make_timer(device)
    ceilings = measure_ceilings(device, measure)
    bench = Bench(device, measure, ceilings)
    if args.smoke:
        shapes, m_values, ranks, batches = [(40, 24)], [5], [4], [1]
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
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
