"""The compile gate (bench/static.py): every Triton kernel compiled for sm_80, sm_86 and sm_90a on
this CPU machine, and the facts of the code checked.

The gate runs once per session in a child process without TRITON_INTERPRET (the interpreter
replaces the kernels it compiles), with the on-disk artifact cache (`$PEFOMED_STATIC_CACHE`,
default ~/.cache/pefomed/static): a warm run takes seconds; a cold one compiles every
(kernel, config, arch), several minutes on 2 cores. Each check is its own test listing every
offending (case, arch, config), so one run shows all that is wrong. `--selfcheck` first proves the
gate can fail: kernels built to break each check must be caught, and a good one must pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pefomed.bench import static

GATE_TIMEOUT_S = 3600


def _run(args: list[str], tmp_path_factory=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "pefomed.bench.static", *args],
        env=env, capture_output=True, text=True, timeout=GATE_TIMEOUT_S,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static") / "gate.json"
    proc = _run(["--json", str(out), "--jobs", str(min(2, os.cpu_count() or 1))])
    if not out.exists():
        pytest.fail(f"the gate did not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    # the exit status agrees with the report
    assert (proc.returncode == 0) == (not static.failures(result)), proc.stdout[-2000:]
    return result


def _kept(gate: dict):
    return [r for r in gate["rows"] if not r["excluded"]]


def _where(r: dict) -> str:
    return f"{r['case']} {static.ARCH_NAMES[r['arch']]} [{r['config']}]"


# --- the gate can fail --------------------------------------------------------------------------


def test_gate_catches_kernels_built_to_fail():
    proc = _run(["--selfcheck"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "selfcheck passed" in proc.stdout


def test_mma_kinds_from_ptx():
    ptx = """
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
    mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 0, 1;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};
    wgmma.fence.sync.aligned;
    """
    assert static.mma_kinds(ptx) == {"bf16": 2, "tf32": 1, "f16": 1}


def test_load_widths_from_ptx():
    ptx = """
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1+0];
    @%p1 ld.global.nc.L1::evict_last.v2.b64 {%rd1, %rd2}, [%rd3+0];
    ld.global.b16 %rs1, [%rd2];
    ld.global.v2.b32 {%r1, %r2}, [%rd2];
    cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;
    cp.async.ca.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 4, %r3;
    """
    widths = static.load_widths(ptx)
    assert widths == {"128": 3, "16": 1, "64": 1, "32": 1}
    assert static.has_128bit_loads(widths)
    assert not static.has_128bit_loads({"16": 4, "64": 2})


def test_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    0 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 472 bytes cmem[0]\n"
    )
    assert static.parse_ptxas(log) == {"stack": 0, "spill_stores": 24, "spill_loads": 28, "regs": 255, "smem_static": 1024}


TTIR = """
#loc = loc("/x/k.py":1:0)
#loc5 = loc("/x/k.py":7:3)
#loc6 = loc("/x/k.py":9:3)
#loc7 = loc("/x/k.py":11:3)
module {
  tt.func public @k(%a: !tt.ptr<bf16> loc("a"(#loc)), %stride: i32 loc("stride"(#loc)), %n: i32 loc("n"(#loc))) {
    %pid = tt.get_program_id x : i32 loc(#loc)
    %r = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc)
    %s = tt.splat %pid : i32 -> tensor<64xi32> loc(#loc)
    %rows = arith.addi %s, %r : tensor<64xi32> loc(#loc)
    %st = tt.splat %stride : i32 -> tensor<64xi32> loc(#loc)
    %bad = arith.muli %rows, %st : tensor<64xi32> loc(#loc5)
    %small = arith.muli %r, %st : tensor<64xi32> loc(#loc6)
    %rows64 = arith.extsi %rows : tensor<64xi32> to tensor<64xi64> loc(#loc)
    %st64 = arith.extsi %st : tensor<64xi32> to tensor<64xi64> loc(#loc)
    %good = arith.muli %rows64, %st64 : tensor<64xi64> loc(#loc7)
    %pa = tt.splat %a : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>> loc(#loc)
    %p1 = tt.addptr %pa, %bad : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc)
    %p2 = tt.addptr %pa, %small : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc)
    %p3 = tt.addptr %pa, %good : tensor<64x!tt.ptr<bf16>>, tensor<64xi64> loc(#loc)
    %acc = scf.for %k0 = %c0 to %n step %c64 iter_args(%it = %p3) -> (tensor<64x!tt.ptr<bf16>>)  : i32 {
      %ks = tt.splat %k0 : i32 -> tensor<64xi32> loc(#loc)
      %loopbad = arith.muli %ks, %st : tensor<64xi32> loc(#loc6)
      %p4 = tt.addptr %it, %loopbad : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc)
      scf.yield %p4 : tensor<64x!tt.ptr<bf16>> loc(#loc)
    } loc(#loc)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""


def test_int32_index_products_from_ttir():
    found = static.int32_index_products(TTIR)
    # a grid-scaled and a loop-scaled index times a runtime stride, in i32; not the block-local
    # range times the stride (bounded by the block), not the i64 product
    assert found == ["k.py:7: %bad = %rows * %st (tensor<64xi32>)", "k.py:9: %loopbad = %ks * %st (tensor<64xi32>)"]


def test_configs_for_and_prune_for_device():
    import triton

    from pefomed.kernels.common import config_id, configs_for, gate_arch, prune_for_device

    a = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3)
    b = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=4)
    assert config_id(a) == "BLOCK_M=128,BLOCK_N=256,w8,s3"
    exclude = {86: {config_id(a)}}
    assert configs_for([a, b], 86, exclude) == [b]
    assert configs_for([a, b], 80, exclude) == [a, b]
    with pytest.raises(RuntimeError, match="at least one valid config"):
        configs_for([a], 86, exclude)
    assert [gate_arch(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (8, 7))] == [80, 86, 86, 90, 90, 80]
    pruner = prune_for_device(exclude)
    assert pruner.exclude == {86: frozenset({config_id(a)})}
    import torch

    assert pruner([a, b], {"x": torch.empty(1)}) == [a, b]  # CPU tensors: nothing to prune


def test_cli_lists_static():
    from pefomed.cli import BENCHES

    assert BENCHES["static"][0] == "pefomed.bench.static"


# --- the kernels pass -------------------------------------------------------------------------


def test_every_kernel_is_compiled(gate):
    assert gate["uncovered"] == [], "kernels without a static case (add STATIC_CASES to their module)"
    assert not [r for r in gate["rows"] if "error" in r], [f"{_where(r)}: {r['error']}" for r in gate["rows"] if "error" in r]


def test_no_spills(gate):
    bad = [f"{_where(r)}: {r['spill_stores']} B / {r['spill_loads']} B ({r['regs']} regs)"
           for r in _kept(gate) if "error" not in r and (r["spill_stores"] or r["spill_loads"])]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_shared_memory_within_each_arch_limit(gate):
    bad = [f"{_where(r)}: {r['smem'] / 1024:.1f} KB > {static.SMEM_LIMIT[r['arch']] // 1024} KB"
           for r in _kept(gate) if "error" not in r and r["smem"] > static.SMEM_LIMIT[r["arch"]]]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_bf16_kernels_use_bf16_mma_never_tf32(gate):
    bad = []
    for r in _kept(gate):
        if "error" in r:
            continue
        bad += [f"{_where(r)}: {v}" for v in r["violations"] if "MMA" in v]
    assert not bad, "\n".join(bad)


def test_streaming_paths_load_128_bits(gate):
    bad = [f"{_where(r)}: {v}" for r in _kept(gate) if "error" not in r for v in r["violations"] if "128-bit" in v]
    assert not bad, "\n".join(bad)


def test_large_offset_index_math_is_64_bit(gate):
    bad = [f"{_where(r)}: {p}" for r in _kept(gate) if "error" not in r for p in r["int32_products"]
           if any(v.startswith("32-bit index products") for v in r["violations"])]  # fmt: skip
    assert not bad, "\n".join(sorted(set(bad)))


def test_every_arch_keeps_a_valid_config(gate):
    bad = [f"{s['case']} {static.ARCH_NAMES[s['arch']]}: {s['kept_passing']} of {s['configs']} configs pass unexcluded"
           for s in gate["summary"] if s["kept_passing"] == 0]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_summary_counts_only_the_kept_configs():
    def row(arch, excluded, regs, spill, smem, mma):
        return {"case": "k.fwd", "arch": arch, "excluded": excluded, "regs": regs, "spill_stores": spill,
                "spill_loads": spill, "smem": smem, "mma": mma}

    result = {"archs": [80, 90], "rows": [
        row(80, False, 100, 0, 48 * 1024, {"bf16": 4}), row(80, True, 255, 8, 160 * 1024, {"bf16": 8}),
        row(90, False, 90, 0, 96 * 1024, {"bf16": 2}), row(90, False, 120, 0, 64 * 1024, {"bf16": 2}),
    ]}  # fmt: skip
    table = static.summary_markdown(result).splitlines()
    assert table[0] == "| kernel case | sm_80 | sm_90a |"
    assert table[2] == ("| `k.fwd` | 1/2, 100 regs, 0 B spill, 48 KB, bf16 | "
                        "2/2, 120 regs, 0 B spill, 96 KB, bf16 |")
