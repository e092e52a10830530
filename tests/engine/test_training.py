"""End-to-end training runs through `train/run.py` in subprocesses (torchrun for two ranks)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "data.synthetic_train=64",
    "data.synthetic_test=8",
    "train.max_steps=20",
    "train.progress_bar=false",
    "lora.dropout=0.0",
    "model.dtype=float32",
]


def command(out: Path, data: Path, extra: list[str], nproc: int = 1) -> list[str]:
    overrides = [
        f"train.output_dir={out}",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"model.tokenizer={data}/tokenizer",
        *TINY,
        *extra,
    ]
    if nproc == 1:
        return [sys.executable, str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), *overrides,
    ]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(cmd: list[str], timeout: int = 600) -> None:
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run(command(out, data_dir, ["train.grad_accum=2", "train.micro_batch_size=2"]))
    return out


@pytest.mark.slow
def test_loss_goes_down_and_checkpoint_is_complete(reference_run):
    curve = losses(reference_run)
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
    final = reference_run / "checkpoints" / "step_20"
    for name in ("adapter_model.safetensors", "adapter_config.json", "projection.safetensors", "config.yaml"):
        assert (final / name).exists(), name
    assert (final / "trainer_state" / "progress.json").exists()
    assert not list((reference_run / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_reproduce_single_process(tmp_path, data_dir, reference_run, strategy):
    out = tmp_path / strategy
    run(command(out, data_dir, ["train.grad_accum=1", "train.micro_batch_size=2", f"train.strategy={strategy}"], nproc=2))
    single, sharded = losses(reference_run), losses(out)
    assert len(sharded) == 20
    worst = max(abs(a - b) for a, b in zip(single, sharded))
    assert worst < 1e-4, (single, sharded)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_with_identical_losses(tmp_path, data_dir, reference_run):
    out = tmp_path / "killed"
    cmd = command(out, data_dir, ["train.grad_accum=2", "train.micro_batch_size=2", "train.save_every=5"])
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + proc.stderr.read()[-2000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 20, "killed too late to test a resume"
    run(cmd)  # the same command resumes from step_10
    assert losses(out) == losses(reference_run)
