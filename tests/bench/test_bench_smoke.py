"""The benchmark harness (bench/kernels.py) on tiny CPU shapes: every case is checked against a
float64 reference before it is timed, a wrong kernel is reported WRONG and never timed, and a
target whose case is wrong reads "FAIL (wrong output)", never PASS.

The smoke run's times are interpreter times and mean nothing; only the structure and the checks
are asserted.
"""

import json

import pytest
import torch

from pefomed.bench import kernels as bench

ROW_FIELDS = {"suite", "case", "shape", "check", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_bytes", "peak_extra_bytes"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results" / "k.json"
    result = bench.main(["--smoke", "--out", str(out)])
    return out, result


def test_smoke_run_checks_and_times_every_case(smoke):
    out, result = smoke
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"device", "date", "torch", "triton", "command", "ceilings", "rows", "targets"} <= saved.keys()
    assert saved["smoke"] is True and saved["command"] == f"python -m pefomed.bench.kernels --smoke --out {out}"

    wrong = [f"{r['case']} {r['shape']}: {r['check']}" for r in saved["rows"] if r.get("check", "ok") != "ok"]
    assert not wrong, wrong
    timed = {r["case"]: r for r in saved["rows"] if "median_ms" in r}
    expected = {
        "frozen F.linear fwd+dX", "lora_linear r=4 p=0.05 fwd+bwd", "PEFT lora.Linear r=4 p=0.05 fwd+bwd",
        "dequantize_nf4", "float32 F.linear", "nf4_linear", "dequantize_nf4 + F.linear",
        "bare GEMM (pre-grouped, contiguous, pre-cast)", "eager view+linear+index_copy_ (same rows)",
        "grouped_projection + placement", "eager view+linear+index_copy fwd+bwd(dW, db)",
        "grouped_projection + placement fwd+bwd(dW, db)",
    }  # fmt: skip
    assert expected <= timed.keys()
    if bench._bitsandbytes() is not None:  # bitsandbytes 0.50 runs its NF4 ops on CPU too
        assert {"bitsandbytes dequantize_4bit", "bitsandbytes matmul_4bit"} <= timed.keys()
    for row in timed.values():
        assert ROW_FIELDS <= row.keys() and row["check"] == "ok"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert timed["lora_linear r=4 p=0.05 fwd+bwd"]["baseline"] == "frozen F.linear fwd+dX"
    assert "speedup_vs_peft" in timed["lora_linear r=4 p=0.05 fwd+bwd"]
    assert "speedup_vs_eager" in timed["grouped_projection + placement"]
    assert "speedup_vs_dequant_gemm" in timed["nf4_linear"]
    # The smoke shapes are not the target shapes, so no target can claim PASS or MISS.
    assert saved["targets"] and {t["status"] for t in saved["targets"]} == {"not measured"}


def test_a_wrong_lora_kernel_is_caught_and_not_timed(monkeypatch):
    import pefomed.kernels.lora as lora

    real = lora.lora_linear

    def off_by_scaling(x, weight, a, b, scaling, *args, **kwargs):
        return real(x, weight, a, b, scaling * 1.5, *args, **kwargs)  # a plausible bug: wrong scaling

    monkeypatch.setattr(lora, "lora_linear", off_by_scaling)
    result = bench.main(["--smoke", "--only", "lora"])
    row = next(r for r in result["rows"] if r["case"] == "lora_linear r=4 p=0.05 fwd+bwd")
    assert row["check"].startswith("WRONG: output 0: relative error") and "median_ms" not in row
    # the baselines are still right
    assert next(r for r in result["rows"] if r["case"] == "frozen F.linear fwd+dX")["check"] == "ok"


def test_a_dequantizer_off_by_one_code_is_caught(monkeypatch):
    import pefomed.kernels.nf4 as nf4

    real = nf4.dequantize_nf4

    def one_wrong(q, *args, **kwargs):
        out = real(q, *args, **kwargs).clone()
        out.view(-1)[7] += 1e-3  # a single element off: the bit-exact check sees it
        return out

    monkeypatch.setattr(nf4, "dequantize_nf4", one_wrong)
    result = bench.main(["--smoke", "--only", "nf4"])
    row = next(r for r in result["rows"] if r["case"] == "dequantize_nf4")
    assert row["check"] == "WRONG: output 0: not bit-identical (1 elements differ)" and "median_ms" not in row


def test_a_crashing_kernel_is_a_wrong_result(monkeypatch):
    import pefomed.kernels.visual_proj as vp

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(vp, "grouped_projection", crash)
    result = bench.main(["--smoke", "--only", "proj"])
    rows = [r for r in result["rows"] if r["case"].startswith("grouped_projection")]
    assert rows and all(r["check"].startswith("WRONG: raised RuntimeError") for r in rows)


def _row(case, shape, ms, check="ok", **extra):
    return {"suite": "x", "case": case, "shape": shape, "check": check, "median_ms": ms, **extra}


def test_targets_pass_miss_and_fail_on_wrong_output():
    lora_shape = [8192, 4096, 4096]
    rows = [
        _row("frozen F.linear fwd+dX", lora_shape, 10.0),
        _row("lora_linear r=64 p=0.05 fwd+bwd", lora_shape, 10.5, ratio_to_baseline=1.05, speedup_vs_peft=1.3,
             peak_extra_vs_peft=0.7),
        _row("PEFT lora.Linear r=64 p=0.05 fwd+bwd", lora_shape, 13.65),
        _row("dequantize_nf4", [4096, 4096], 0.1, speedup_vs_bitsandbytes=1.1, pct_bw_ceiling=75.0),
        _row("bitsandbytes dequantize_4bit", [4096, 4096], 0.11),
    ]  # fmt: skip
    status = {t["target"]: t["status"] for t in bench.evaluate_targets(rows, {})}
    assert status["LoRA fwd+bwd (M=8192, 4096x4096, r=64, p=0.05) <= 1.10x frozen base fwd + dX"] == "PASS"
    assert status["LoRA >= 1.15x faster than PEFT lora.Linear (same case)"] == "PASS"
    assert status["LoRA peak memory below PEFT's (same case)"] == "PASS"
    assert status["NF4 dequant 4096x4096 >= 1.2x bitsandbytes dequantize_4bit"] == "MISS"
    assert status["NF4 dequant 4096x4096 >= 70% of copy bandwidth"] == "PASS"
    assert status["NF4 linear M=8192 (4096x4096) <= 1.10x bf16 F.linear"] == "not measured"

    # the same figures, but our LoRA output was wrong: nothing about it can pass
    rows[1] = {"suite": "x", "case": rows[1]["case"], "shape": lora_shape, "check": "WRONG: output 0: relative error 0.3 > 0.02"}
    lora_targets = [t for t in bench.evaluate_targets(rows, {}) if t["target"].startswith("LoRA")]
    assert {t["status"] for t in lora_targets} == {"FAIL (wrong output)"}
    # a wrong baseline fails the comparison too
    rows[2]["check"] = "WRONG: output 1: relative error 1 > 0.02"
    peft = next(t for t in bench.evaluate_targets(rows, {}) if "PEFT" in t["target"])
    assert peft["status"] == "FAIL (wrong output)"


def test_compare_rules():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert bench.compare(a, a.double(), 0) is None
    assert bench.compare(a + 1e-6, a, 1e-4) is None
    assert "relative error" in bench.compare(a * 1.1, a, 1e-2)
    assert "non-finite" in bench.compare(torch.tensor([float("nan")]), torch.tensor([0.0]), 1.0)
    assert "shape" in bench.compare(a[:2], a, 1.0)
    assert "missing" in bench.compare((a, None), (a, a), 1.0)


def test_only_selects_suites_and_rejects_unknown_names():
    result = bench.main(["--smoke", "--only", "proj"])
    assert {r["suite"] for r in result["rows"]} == {"proj"}
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "proj,flash"])
