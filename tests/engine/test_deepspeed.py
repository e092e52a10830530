"""train.strategy=deepspeed on the CPU accelerator (DS_ACCELERATOR=cpu, gloo), end to end.

Two ranks under ZeRO-2 (the `deepspeed` launcher) and ZeRO-3 (torchrun) reproduce the
single-process loss curve over 20 steps; a run SIGKILLed mid-training resumes with the same
losses step for step; a 2-rank checkpoint resumes in one process through DeepSpeed's universal
checkpoint; ZeRO-Offload of the optimizer and the parameters trains the same curve; and the
checkpoint's adapter loads in PEFT with the logits of our model. What only a GPU shows:
`overlap_comm` (CUDA streams), pinned host buffers, `DeepSpeedCPUAdam` speed and bf16/fp16
(the CPU runs are fp32).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pefomed.engine.checkpoint import COMPLETE_MARK, latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.synthetic_train=64", "data.synthetic_test=8", "train.max_steps=20", "train.progress_bar=false",
    "lora.dropout=0.0", "model.dtype=float32",
]  # fmt: skip
SINGLE = ["train.grad_accum=2", "train.micro_batch_size=2"]  # the reference: 4 samples a step
TWO_RANKS = ["train.grad_accum=1", "train.micro_batch_size=2", "train.strategy=deepspeed"]
INFERENCE_MODE_HINT = (
    "models/vlm.py runs the frozen ViT under torch.inference_mode unless it is FSDP2-sharded; a ZeRO-3 "
    "partitioned tower (parameters with ds_id) must run under no_grad too, or the parameters ZeRO-3 prefetches "
    "during its forward become inference tensors"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(out: Path, data: Path, extra: list[str], nproc: int = 1, launcher: str = "torchrun") -> list[str]:
    script = [
        str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), f"train.output_dir={out}",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", f"model.tokenizer={data}/tokenizer",
        *TINY, *extra,
    ]  # fmt: skip
    if nproc == 1:
        return [sys.executable, *script]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
                f"--master_port={free_port()}", *script]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert "Inference tensors cannot be saved for backward" not in result.stderr, INFERENCE_MODE_HINT
    assert result.returncode == 0, output
    assert "process group is destroyed but still referenced" not in result.stderr, output  # see shutdown_distributed
    return result


def records(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    return lines


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out)]


def worst(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic data and the single-process reference run, shared by the session's modules."""
    base = tmp_path_factory.getbasetemp()
    data, reference = base / "shared_synthetic", base / "shared_reference"
    if not (reference / "checkpoints" / "step_20" / COMPLETE_MARK).is_file():
        shutil.rmtree(reference, ignore_errors=True)
        run(command(reference, data, SINGLE))
    return data, reference


@pytest.fixture(scope="module")
def zero2_run(shared, tmp_path_factory) -> tuple[Path, str]:
    """ZeRO-2 on 2 ranks, started by the `deepspeed` launcher; its output folder and log."""
    data, _ = shared
    out = tmp_path_factory.mktemp("zero2")
    result = run(command(out, data, [*TWO_RANKS, "train.save_every=10"], nproc=2, launcher="deepspeed"))
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def zero2(zero2_run) -> Path:
    return zero2_run[0]


def test_zero2_under_the_deepspeed_launcher_equals_one_process(shared, zero2_run):
    _, reference = shared
    zero2, log = zero2_run
    assert "--local_rank=1" in log  # the launcher's own argument reached run.py
    assert len(losses(zero2)) == 20
    assert worst(losses(reference), losses(zero2)) < 1e-4
    final = latest_checkpoint(zero2)
    assert final.name == "step_20" and not list((zero2 / "checkpoints").glob("*.tmp"))
    for name in ("adapter_model.safetensors", "adapter_config.json", "projection.safetensors", "config.yaml"):
        assert (final / name).is_file(), name
    state = final / "trainer_state" / "deepspeed" / "state"
    assert sorted(p.name for p in state.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]  # fmt: skip
    progress = json.loads((final / "trainer_state" / "progress.json").read_text())
    assert (progress["world_size"], progress["strategy"], progress["data_positions"]) == (2, "deepspeed", [40, 40])
    assert not (final / "trainer_state" / "dcp").exists()


def test_zero3_two_ranks_equal_one_process(shared, tmp_path):
    data, reference = shared
    out = tmp_path / "zero3"
    run(command(out, data, [*TWO_RANKS, "train.deepspeed_stage=3"], nproc=2))
    assert worst(losses(reference), losses(out)) < 1e-4
    progress = json.loads((latest_checkpoint(out) / "trainer_state" / "progress.json").read_text())
    assert progress["world_size"] == 2


def test_sigkill_mid_run_resumes_step_for_step(shared, zero2, tmp_path):
    data, _ = shared
    out = tmp_path / "killed"
    cmd = command(out, data, [*TWO_RANKS, "train.save_every=5"], nproc=2)
    # The launcher and both ranks die at once, as when a node is lost.
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + proc.stderr.read()[-2000:])
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 20, "killed too late to test a resume"
    assert latest_checkpoint(out).name in ("step_10", "step_15")
    run(cmd)
    assert losses(out) == losses(zero2)  # same world size, same engine state: bit for bit


def test_resume_at_another_world_size_through_a_universal_checkpoint(shared, zero2, tmp_path):
    data, reference = shared
    out = tmp_path / "one_rank"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(zero2 / "checkpoints" / "step_10", out / "checkpoints" / "step_10")
    lines = (zero2 / "metrics.jsonl").read_text().splitlines()[:10]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    # One process with grad_accum 2 keeps the global batch of 2 ranks x 1, and the data order.
    result = run(command(out, data, ["train.grad_accum=2", "train.micro_batch_size=2", "train.strategy=deepspeed"]))
    assert "written at world size 2, resumed at 1" in result.stderr
    assert (out / "checkpoints" / "step_10" / "trainer_state" / "deepspeed" / "state_universal").is_dir()
    assert worst(losses(reference), losses(out)) < 1e-4
    progress = json.loads((latest_checkpoint(out) / "trainer_state" / "progress.json").read_text())
    assert (progress["step"], progress["world_size"], progress["data_positions"]) == (20, 1, [80])


def test_offload_of_optimizer_and_parameters_trains_the_same_curve(shared, tmp_path):
    data, reference = shared
    out = tmp_path / "offload"
    user = tmp_path / "ds.json"
    # torch's AdamW on the host instead of DeepSpeedCPUAdam, whose C++ build takes minutes.
    user.write_text(json.dumps({"zero_force_ds_cpu_optimizer": False}))
    run(command(out, data, [*TWO_RANKS, "train.deepspeed_stage=3", "train.offload_optimizer=cpu",
                            "train.offload_params=cpu", f"train.deepspeed_config={user}", "train.max_steps=8"],
                nproc=2))  # fmt: skip
    assert worst(losses(reference)[:8], losses(out)) < 1e-4


def test_the_checkpoints_adapter_loads_in_peft(zero2):
    """The exported adapter in a transformers LLaMA through PEFT gives our model's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from pefomed.engine.build import build_model
    from pefomed.engine.checkpoint import load_exports
    from pefomed.engine.config import load_config

    final = latest_checkpoint(zero2)
    cfg = load_config(final / "config.yaml", ["train.device=cpu"])
    ours = build_model(cfg, "cpu").eval()
    load_exports(final, ours)
    llm = ours.llm
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm.config.to_hf_dict())).eval()
    frozen = {k: v for k, v in llm.state_dict().items() if ".lora_" not in k}
    missing, unexpected = hf.load_state_dict(frozen, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with_adapter = peft.PeftModel.from_pretrained(hf, str(final)).eval()
    ids = torch.randint(3, llm.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = with_adapter(input_ids=ids).logits.double()
        got = llm(ids).double()
        with with_adapter.disable_adapter():
            plain = with_adapter(input_ids=ids).logits.double()
    assert (got - want).norm() / want.norm() < 1e-5
    assert (plain - want).norm() / want.norm() > 1e-4  # the trained adapter does change the logits
