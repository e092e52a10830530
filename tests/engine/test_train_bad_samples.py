"""Unreadable images under 2 ranks: every rank decides together, saves, and stops (or goes on).

About 7% of the synthetic dataset's image files are overwritten with garbage. With
`data.max_bad_fraction` below that, both ranks must stop with exit code 2 after a complete
checkpoint (before, the rank that crossed the limit waited at the checkpoint's barrier while the
other waited in the step's all-reduce, until the gloo timeout). Above it, training finishes and
each rank logs its bad files. The stopping step and the counts are checked against a replay of
the data order, under ddp and deepspeed (stop) and fsdp2 (finish). The finished 2-rank checkpoint
is then refused by a 1-process resume: its ranks skipped different numbers of bad samples, so they
stand at different places in the data order, which another world size cannot continue exactly.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pefomed.engine.batches import MicroBatches
from pefomed.engine.checkpoint import COMPLETE_MARK, latest_checkpoint
from pefomed.engine.config import load_config
from pefomed.engine.data.sources import load_samples
from pefomed.engine.trainer import MIN_SAMPLES_JUDGED

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # a hang until the gloo timeout (30 min) must fail fast
N_TRAIN, MICRO, SEED = 64, 2, 0


def overrides(out: Path, data: Path, extra: list[str]) -> list[str]:
    return [
        f"train.output_dir={out}",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"model.tokenizer={data}/tokenizer",
        f"data.synthetic_train={N_TRAIN}",
        "data.synthetic_test=8",
        "train.progress_bar=false",
        "model.dtype=float32",
        f"train.micro_batch_size={MICRO}",
        "train.grad_accum=1",
        f"train.seed={SEED}",
        *extra,
    ]


def run_command(args: list[str], nproc: int) -> list[str]:
    script = [str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), *args]
    if nproc == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]


def child_env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    """The dataset with every 14th training image unreadable; the bad samples' indices."""
    root = tmp_path_factory.mktemp("bad_samples_data")
    cfg = load_config(ROOT / "configs/demo.yaml", overrides(root / "unused", root, []))
    samples = load_samples(cfg.data.train, cfg)
    images = sorted({s.image_path for s in samples})

    def bad_of(broken_images):
        return {i for i, s in enumerate(samples) if s.image_path in broken_images}

    # One image in 14, starting where the bad samples fall on both ranks' first epoch.
    broken = next(set(images[k::14]) for k in range(14) if replay(bad_of(set(images[k::14])), 1)[0][3] == [1, 1])
    for path in broken:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    bad = bad_of(broken)
    assert 0.04 < len(bad) / len(samples) < 0.11, len(bad) / len(samples)
    return root, broken, bad


class Flags:
    """A stand-in dataset that is bad exactly where the real one is: the same order, no images."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"bad": str(i), "index": i} if i in self.bad else {"i": i}


def replay(bad: set[int], steps: int) -> list[tuple[int, int, list[int], list[int]]]:
    """After each step: samples seen and bad samples over both ranks, each rank's position, and
    whether each rank has met a bad sample in its first epoch (known after any step)."""
    streams = [MicroBatches(Flags(N_TRAIN, bad), lambda items: {"n": len(items)}, micro_batch_size=MICRO,
                            seed=SEED, rank=r, world_size=2) for r in (0, 1)]  # fmt: skip
    iters = [iter(s) for s in streams]
    # Rank r draws the global order's samples r, r + 2, ...: its first epoch is those below N_TRAIN.
    first_epoch = [{streams[r].index_at(p) for p in range((N_TRAIN - r + 1) // 2)} for r in (0, 1)]
    has_bad = [int(bool(first_epoch[r] & bad)) for r in (0, 1)]
    out, seen, n_bad = [], 0, 0
    for _ in range(steps):
        for it in iters:
            batch = next(it)
            seen += batch["n"] + batch["n_bad"]
            n_bad += batch["n_bad"]
        out.append((seen, n_bad, [s.position for s in streams], has_bad))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_below_the_limit_both_ranks_save_and_exit_2(broken_data, tmp_path, strategy):
    data, broken, bad = broken_data
    limit = 0.02
    args = overrides(tmp_path / "run", data, [f"data.max_bad_fraction={limit}", "train.max_steps=20",
                                              f"train.strategy={strategy}"])  # fmt: skip
    # The two ranks are started as torchrun starts them (same environment variables), but by
    # this test, so that each one's own exit code is seen: torchrun stops the other workers as
    # soon as one has failed, and reports only the first.
    port = str(free_port())
    procs = [
        subprocess.Popen(run_command(args, 1), env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                         LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the ranks hung instead of stopping together")
    codes = [proc.returncode for proc in procs]
    assert codes == [2, 2], [err[-3000:] for _, err in outputs]

    # The stop comes in the first step whose totals reach MIN_SAMPLES_JUDGED samples with more
    # than `limit` of them bad; the checkpoint is that step's start.
    steps = replay(bad, 20)
    stop = next(i for i, (seen, n_bad, *_) in enumerate(steps) if seen >= MIN_SAMPLES_JUDGED and n_bad / seen > limit)
    seen, n_bad, *_ = steps[stop]
    for _, err in outputs:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err[-3000:]
        assert f"{n_bad} of {seen} samples could not be used" in errors[0]
        assert f"data.max_bad_fraction={limit}" in errors[0]
        assert any(f"{path}: cannot decode the image" in errors[0] for path in broken)
    saved = latest_checkpoint(tmp_path / "run")
    assert saved is not None and saved.name == f"step_{stop}" and (saved / COMPLETE_MARK).is_file()
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name != saved.name]
    progress = json.loads((saved / "trainer_state" / "progress.json").read_text())
    before = steps[stop - 1][:3] if stop > 0 else (0, 0, [0, 0])
    assert progress["world_size"] == 2
    assert (progress["samples_seen"], progress["bad_samples"], progress["data_positions"]) == before
    for name in ("adapter_model.safetensors", "projection.safetensors", "config.yaml"):
        assert (saved / name).is_file()
    assert sorted(p.name for p in (saved / "trainer_state").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


@pytest.fixture(scope="module")
def finished_run(broken_data, tmp_path_factory):
    """fsdp2, 2 ranks, limit above 7%, activation checkpointing and LoRA dropout on, 1 worker."""
    data, _, _ = broken_data
    out = tmp_path_factory.mktemp("finished")
    steps = 17  # 17 x 2 usable samples per rank draw each rank's whole first epoch (32 samples)
    args = overrides(out, data, ["data.max_bad_fraction=0.5", f"train.max_steps={steps}", "train.strategy=fsdp2",
                                 "train.activation_checkpointing=true", "lora.dropout=0.1", "data.num_workers=1"])  # fmt: skip
    result = subprocess.run(run_command(args, 2), env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, steps, result.stderr


def test_above_the_limit_training_finishes_and_every_rank_logs_its_bad_files(broken_data, finished_run):
    _, broken, bad = broken_data
    out, steps, stderr = finished_run
    logged = re.findall(r"^rank (\d): skipped a bad sample: (.+?): (.+)$", stderr, flags=re.MULTILINE)
    seen, n_bad, *_ = replay(bad, steps)[-1]
    assert len(logged) == n_bad
    assert {rank for rank, _, _ in logged} == {"0", "1"}
    assert {path for _, path, _ in logged} == broken  # every rank drew its whole first epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert (records[-1]["samples_seen"], records[-1]["bad_samples"]) == (seen, n_bad)
    assert f"{n_bad} of {seen} samples could not be used and were skipped" in stderr
    assert "activation checkpointing: 3 blocks" in stderr
    final = latest_checkpoint(out)
    assert final.name == f"step_{steps}"
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(re.fullmatch(r"base_model\.model\.model\.layers\.\d\.\w+\.\w+_proj\.lora_[AB]\.weight", k)
                        for k in keys), keys  # fmt: skip


def test_one_process_does_not_resume_a_two_rank_checkpoint(broken_data, finished_run):
    data, _, bad = broken_data
    out, steps, _ = finished_run
    positions = replay(bad, steps)[-1][2]
    assert positions[0] != positions[1]  # the ranks met different numbers of bad samples
    args = overrides(out, data, ["data.max_bad_fraction=0.5", f"train.max_steps={steps + 3}"])
    result = subprocess.run(run_command(args, 1), env=child_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"step_{steps}" in error
    assert "world size 2" in error and "world size 1" in error and "--nproc_per_node=2" in error
    assert f"different places in the data order {positions}" in error
    assert latest_checkpoint(out).name == f"step_{steps}"  # nothing was written
