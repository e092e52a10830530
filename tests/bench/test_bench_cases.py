"""CI's short CPU smoke of the pytest-benchmark cases under bench/: they all run, on tiny shapes.

Nothing is asserted about time: only that every step and kernel case ran as a benchmark and
recorded its configuration, so that `--benchmark-compare` against a saved baseline has something
to compare.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_cases_run_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    pytest_bin = Path(sys.executable).with_name("pytest")
    command = [str(pytest_bin), "-q", "-p", "no:cacheprovider", "bench", "--benchmark-only", "--bench-size", "smoke",
               f"--benchmark-json={out}", f"--basetemp={tmp_path / 'tmp'}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    names = {b["name"] for b in results["benchmarks"]}
    expected_steps = {f"test_train_step[{case}-{side}]" for case in ("pefomed-vqa", "med-idefics-qlora")
                      for side in ("ours", "hf+peft")}  # fmt: skip
    assert expected_steps <= names
    kernels = {n.split("[")[0] for n in names} - {"test_train_step"}
    assert kernels == {"test_lora", "test_nf4_dequantize", "test_nf4_linear", "test_grouped_projection"}
    for b in results["benchmarks"]:
        assert b["stats"]["rounds"] >= 1
        if b["name"].startswith("test_train_step"):
            info = b["extra_info"]
            assert info["side"] in ("ours", "hf+peft") and info["parity_loss_rel_err"] <= 1e-5
            assert info["batch_size"] == 2 and info["target_tokens"] > 0
