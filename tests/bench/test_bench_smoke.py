"""The benchmark harness runs end to end on tiny CPU shapes (no timing is asserted)."""

import json


def test_smoke_run_writes_json(tmp_path):
    from bench.kernels import main

    out = tmp_path / "k.json"
    result = main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["smoke"] is True and saved["rows"] == result["rows"]
    cases = {r["case"] for r in saved["rows"]}
    assert {"frozen F.linear fwd+bwd(dX)", "lora_linear r=4 p=0.05 fwd+bwd", "PEFT lora.Linear r=4 p=0.05 fwd+bwd",
            "dequantize_nf4", "nf4_linear", "eager view+linear+cat", "grouped_projection + placement"} <= cases
    assert all("median_ms" in r or "note" in r for r in saved["rows"])
    assert {"device", "date", "command", "torch", "triton"} <= saved.keys()
