"""The benchmark harness runs end to end on tiny CPU shapes and writes a complete JSON record.

Only the structure is checked: the smoke run's times are interpreter times and mean nothing.
"""

import json

import pytest

ROW_FIELDS = {"suite", "case", "shape", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "peak_bytes", "peak_extra_bytes"}


def test_smoke_run_writes_json(tmp_path):
    from pefomed.bench.kernels import main

    out = tmp_path / "results" / "k.json"
    result = main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"device", "date", "torch", "triton", "command", "ceilings", "rows", "targets"} <= saved.keys()
    assert saved["smoke"] is True and saved["command"] == f"python -m pefomed.bench.kernels --smoke --out {out}"

    timed = {r["case"]: r for r in saved["rows"] if "median_ms" in r}
    expected = {
        "frozen F.linear fwd+bwd(dX)", "lora_linear r=4 p=0.05 fwd+bwd", "PEFT lora.Linear r=4 p=0.05 fwd+bwd",
        "dequantize_nf4", "float32 F.linear", "nf4_linear", "bare GEMM (pre-grouped, contiguous)",
        "eager view+linear+cat", "grouped_projection + placement",
        "eager view+linear+cat fwd+bwd(dW, db)", "grouped_projection + placement fwd+bwd(dW, db)",
    }  # fmt: skip
    assert expected <= timed.keys()
    for row in timed.values():
        assert ROW_FIELDS <= row.keys()
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert timed["lora_linear r=4 p=0.05 fwd+bwd"]["baseline"] == "frozen F.linear fwd+bwd(dX)"
    assert "speedup_vs_peft" in timed["lora_linear r=4 p=0.05 fwd+bwd"]
    assert "speedup_vs_eager" in timed["grouped_projection + placement"]
    # On CPU bitsandbytes' CUDA dequant is never timed: the row says so instead of a number.
    bnb = next(r for r in saved["rows"] if r["case"] == "bitsandbytes dequantize_4bit")
    assert "median_ms" not in bnb and bnb["note"].startswith("bitsandbytes unavailable")
    # The smoke shapes are not the target shapes, so no target can claim PASS or MISS.
    assert saved["targets"] and {t["status"] for t in saved["targets"]} == {"not measured"}


def test_only_selects_suites_and_rejects_unknown_names():
    from pefomed.bench.kernels import main

    result = main(["--smoke", "--only", "proj"])
    assert {r["suite"] for r in result["rows"]} == {"proj"}
    with pytest.raises(SystemExit):
        main(["--smoke", "--only", "proj,flash"])
