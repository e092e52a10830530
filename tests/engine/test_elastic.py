"""Elastic restarts and checkpoints that move between world sizes.

`torchrun --max-restarts=1`: one worker of a 2-rank FSDP2 run is SIGKILLed mid-training; torchrun
restarts the group, which resumes from the latest complete checkpoint and ends on the
single-process loss curve. A 2-rank FSDP2 checkpoint resumes in one process (DCP reshards the
sharded optimizer) in the same data order. Where the order cannot continue exactly (ranks at
different places after skipping bad samples, or a count the new world size does not divide) the
resume is refused; the resharded positions are checked against a replay of the global order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pefomed.engine.batches import CannotReshard, MicroBatches, reshard_positions
from pefomed.engine.checkpoint import COMPLETE_MARK, DATA_ORDER, data_positions, latest_checkpoint
from pefomed.engine.distributed import DistEnv
from pefomed.models.loading import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.synthetic_train=64", "data.synthetic_test=8", "train.max_steps=20", "train.progress_bar=false",
    "lora.dropout=0.0", "model.dtype=float32",
]  # fmt: skip
SINGLE = ["train.grad_accum=2", "train.micro_batch_size=2"]
FSDP2 = ["train.grad_accum=1", "train.micro_batch_size=2", "train.strategy=fsdp2"]


def script(out: Path, data: Path, extra: list[str]) -> list[str]:
    return [
        str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), f"train.output_dir={out}",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", f"model.tokenizer={data}/tokenizer",
        *TINY, *extra,
    ]  # fmt: skip


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return [r["loss"] for r in records]


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
        run([sys.executable, *script(reference, data, SINGLE)])
    return data, reference


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def worker_pid(agent: int, local_rank: int) -> int | None:
    for pid in children(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_worker_restarts_from_the_latest_checkpoint(shared, tmp_path):
    data, reference = shared
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           *script(out, data, [*FSDP2, "train.save_every=5"])]  # fmt: skip
    agent = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        if agent.poll() is not None:
            pytest.fail("the run ended before a worker could be killed: " + agent.stderr.read()[-2000:])
        time.sleep(0.05)
    victim = worker_pid(agent.pid, local_rank=1)
    assert victim is not None, "no worker with LOCAL_RANK=1 under torchrun"
    os.kill(victim, signal.SIGKILL)
    killed_at = len(metrics.read_text().splitlines())
    try:
        stdout, stderr = agent.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, signal.SIGKILL)
        stdout, stderr = agent.communicate()
        pytest.fail("the restarted group did not finish: " + stderr[-3000:])
    assert agent.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert killed_at < 20, "killed too late to test a restart"
    resumed = [line for line in stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and ("step_10" in resumed[0] or "step_15" in resumed[0]), stderr[-3000:]
    assert worst(losses(reference), losses(out)) < 1e-4
    assert latest_checkpoint(out).name == "step_20"


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_checkpoint_resumes_in_one_process_in_the_same_order(shared, tmp_path):
    data, reference = shared
    out = tmp_path / "resharded"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *script(out, data, [*FSDP2, "train.max_steps=10"])])  # fmt: skip
    # One process with grad_accum 2 keeps the global batch and the data order of 2 ranks x 1.
    result = run([sys.executable, *script(out, data, ["train.grad_accum=2", "train.micro_batch_size=2",
                                                      "train.strategy=fsdp2"])])  # fmt: skip
    assert "written at world size 2, resumed at 1" in result.stderr
    assert worst(losses(reference), losses(out)) < 1e-4
    progress = json.loads((latest_checkpoint(out) / "trainer_state" / "progress.json").read_text())
    assert (progress["world_size"], progress["data_positions"]) == (1, [80])


# ---------------------------------------------------------------- the data order, without processes


class Items:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"i": i}


def drawn(world_size: int, positions: list[int], n: int, rounds: int, seed: int = 3) -> list[int]:
    """`rounds` samples of each rank from its position on, interleaved in the global order."""
    streams = []
    for rank, start in enumerate(positions):
        s = MicroBatches(Items(n), lambda items: {"ids": [it["i"] for it in items]}, micro_batch_size=1, seed=seed,
                         rank=rank, world_size=world_size)  # fmt: skip
        s.skip_to(start)
        streams.append(iter(s))
    out = []
    for _ in range(rounds):
        for stream in streams:
            out.extend(next(stream)["ids"])
    return out


@pytest.mark.parametrize("n,saved,new,position", [(23, 2, 1, 9), (23, 2, 3, 12), (40, 4, 2, 25), (7, 1, 7, 14)])
def test_resharded_positions_continue_the_global_order(n, saved, new, position):
    # The order that one process would draw from the first sample on...
    consumed = saved * position
    whole = drawn(1, [0], n, rounds=consumed + 2 * n)  # past the epoch boundaries
    # ...is what `saved` ranks drew up to their common position, then `new` ranks from theirs.
    assert drawn(saved, [0] * saved, n, rounds=position) == whole[:consumed]
    positions = reshard_positions([position] * saved, new)
    assert positions == [consumed // new] * new
    assert drawn(new, positions, n, rounds=2 * n // new + 1)[: 2 * n] == whole[consumed : consumed + 2 * n]


def test_positions_that_cannot_be_resharded_are_refused():
    with pytest.raises(CannotReshard, match=r"different places in the data order \[10, 11\]"):
        reshard_positions([10, 11], 1)
    with pytest.raises(CannotReshard, match="drawn 6 samples of the data order together, which 4 ranks cannot"):
        reshard_positions([3, 3], 4)


def test_a_refused_reshard_names_the_saved_world_size(tmp_path):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    progress = {"data_positions": [10, 11], "world_size": 2, "data_order": DATA_ORDER, "step": 5}
    with pytest.raises(CheckpointError) as raised:
        data_positions(tmp_path, progress, 2, env, n_samples=64)
    message = str(raised.value)
    assert "world size 2" in message and "world size 1" in message and "--nproc_per_node=2" in message
    assert "[10, 11]" in message
    # A checkpoint from before the one global order, whose epochs ended elsewhere, is refused too.
    old = {"data_positions": [10, 10], "world_size": 2, "step": 5}
    with pytest.raises(CheckpointError, match="before the data order became one stream"):
        data_positions(tmp_path, old, 2, env, n_samples=65)
    assert data_positions(tmp_path, old, 2, env, n_samples=64) == [20]
