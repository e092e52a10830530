"""The trainer and checkpoints on a toy model: fast, in-process, no ViT or LLM needed."""

import json
import logging
import shutil

import pytest
import torch
from torch import nn

from pefomed.engine import checkpoint, distributed
from pefomed.engine.batches import STARVED_AFTER, MicroBatches
from pefomed.engine.config import load_config
from pefomed.engine.lora import freeze_except
from pefomed.engine.trainer import TooManyBadSamples, Trainer
from pefomed.errors import UserError


class Toy(nn.Module):
    """Per-token squared error; the number of target tokens varies per sample."""

    def __init__(self):
        super().__init__()
        self.llm = nn.Module()
        self.llm.q_proj = nn.Module()
        self.llm.q_proj.lora_A = nn.Linear(4, 2, bias=False)
        self.llm.q_proj.lora_B = nn.Linear(2, 4, bias=False)
        nn.init.normal_(self.llm.q_proj.lora_B.weight)
        self.llm.frozen = nn.Linear(4, 4)
        self.connector = nn.Module()
        self.connector.llama_proj = nn.Linear(4, 1)

    def token_losses(self, batch):
        x = batch["x"]  # [B, T, 4]
        h = self.llm.frozen(x) + self.llm.q_proj.lora_B(self.llm.q_proj.lora_A(x))
        err = (self.connector.llama_proj(h).squeeze(-1) - 1.0) ** 2  # [B, T]
        keep = batch["labels"] != -100
        return err[:, 1:][keep[:, 1:]]

    def forward(self, batch):
        losses = self.token_losses(batch)
        return losses.mean(), torch.tensor(losses.numel())


class Data:
    def __init__(self, n=24, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return {"bad": f"img{i}.png: cannot identify image file", "index": i}
        g = torch.Generator().manual_seed(i)
        labels = torch.full((6,), -100)
        labels[6 - (1 + i % 5) :] = 1  # 1 to 5 target tokens
        return {"x": torch.randn(6, 4, generator=g), "labels": labels}


def collate(items):
    return {
        "x": torch.stack([it["x"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
        "input_ids": torch.zeros(len(items), 6, dtype=torch.long),
    }


def make_trainer(out, data=None, extra=()):
    cfg = load_config(
        None,
        [
            f"train.output_dir={out}",
            "train.max_steps=8",
            "train.progress_bar=false",
            "optim.lr=0.05",
            "optim.warmup_steps=2",
            "train.grad_accum=2",
            "train.micro_batch_size=2",
            *extra,
        ],
    )
    torch.manual_seed(0)
    model = Toy()
    freeze_except(model, [n for n, _ in model.named_parameters() if "lora" in n or "connector" in n])
    batches = MicroBatches(data or Data(), collate, micro_batch_size=2, seed=1)
    return Trainer(config=cfg, model=model, batches=batches, env=distributed.init_distributed("cpu"))


def read_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_is_normalized_by_target_tokens(tmp_path):
    trainer = make_trainer(tmp_path)
    micro = [next(iter(trainer.batches)) for _ in range(2)]
    n_tokens = trainer._reduce_counts(micro).target_tokens
    loss_sum = trainer._accumulate(micro, n_tokens)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    # Reference: one mean over every target token of the step, in float64.
    model = trainer.model.double()
    for p in model.parameters():
        p.grad = None
    batch = {k: torch.cat([m[k] for m in micro]) for k in ("x", "labels")}
    batch["x"] = batch["x"].double()
    tokens = model.token_losses(batch)
    tokens.mean().backward()
    assert n_tokens == tokens.numel()
    assert loss_sum / n_tokens == pytest.approx(tokens.mean().item(), rel=1e-6)
    for name, grad in got.items():
        ref = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-7)


@pytest.fixture
def trainer_log():
    """The trainer's log records (the `pefomed` logger may not propagate to pytest's handler)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("pefomed.engine.trainer")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_resume_gives_identical_losses(tmp_path):
    full = tmp_path / "full"
    make_trainer(full).train()
    part = tmp_path / "part"
    make_trainer(part, extra=["train.save_every=3"]).train()
    # Forget everything after step 3, as if the run had been killed right after that save.
    for step in (6, 8):
        shutil.rmtree(part / "checkpoints" / f"step_{step}")
    make_trainer(part, extra=["train.save_every=3"]).train()
    assert read_losses(part) == read_losses(full)


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, trainer_log):
    full = tmp_path / "full"
    make_trainer(full).train()
    part = tmp_path / "part"
    make_trainer(part, extra=["train.save_every=3"]).train()
    for step in (6, 8):
        shutil.rmtree(part / "checkpoints" / f"step_{step}")
    # Killed while writing step 5's line: steps 1-4 whole, then half a line and no newline.
    metrics = part / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    make_trainer(part, extra=["train.save_every=3"]).train()
    assert read_losses(part) == read_losses(full)
    warnings = [r.getMessage() for r in trainer_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(metrics) in warnings[0] and "line 5" in warnings[0], warnings


def test_malformed_metrics_line_before_the_end_is_an_error(tmp_path):
    part = tmp_path / "part"
    make_trainer(part, extra=["train.max_steps=3"]).train()
    metrics = part / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=rf"{metrics}: line 2 is not a JSON object"):
        make_trainer(part, extra=["train.max_steps=5"]).train()


def test_incomplete_checkpoints_are_never_resumed_or_loaded(tmp_path):
    reference = tmp_path / "reference"
    make_trainer(reference, extra=["train.max_steps=4"]).train()
    out = tmp_path / "run"
    make_trainer(out, extra=["train.max_steps=2"]).train()
    root = out / "checkpoints"
    # Whole copies of step_2 that a killed save could leave: no COMPLETE marker, or still *.tmp.
    shutil.copytree(root / "step_2", root / "step_7")
    (root / "step_7" / checkpoint.COMPLETE_MARK).unlink()
    shutil.copytree(root / "step_2", root / "step_9.tmp")  # COMPLETE written, killed before the rename
    assert checkpoint.latest_checkpoint(out) == root / "step_2"
    trainer = make_trainer(out, extra=["train.max_steps=4"])
    for path in (root / "step_7", root / "step_9.tmp"):
        with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint.*step_2"):
            checkpoint.load_checkpoint(path, model=trainer.model, optimizer=trainer.optimizer, env=trainer.env)
        with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
            checkpoint.load_exports(path, trainer.model)
    trainer.train()  # resumes from step_2, not from step_7 or step_9.tmp
    assert read_losses(out) == read_losses(reference)


def test_checkpoint_of_another_world_size_is_refused(tmp_path):
    make_trainer(tmp_path, extra=["train.max_steps=2"]).train()
    progress_file = tmp_path / "checkpoints" / "step_2" / "trainer_state" / "progress.json"
    progress = json.loads(progress_file.read_text())
    assert progress["world_size"] == 1 and progress["data_positions"] == [progress["data_position"]]
    progress_file.write_text(json.dumps({**progress, "world_size": 2}))
    with pytest.raises(checkpoint.CheckpointError) as raised:
        make_trainer(tmp_path, extra=["train.max_steps=4"]).train()
    message = str(raised.value)
    assert "world size 2" in message and "world size 1" in message and "--nproc_per_node=2" in message


def test_too_many_bad_samples_saves_the_step_start_then_stops(tmp_path):
    bad = set(range(0, 40, 3))  # a third of the files are broken
    trainer = make_trainer(
        tmp_path, data=Data(n=40, bad=bad), extra=["data.max_bad_fraction=0.1", "train.max_steps=50"]
    )
    with pytest.raises(TooManyBadSamples, match="cannot identify image file") as raised:
        trainer.train()
    # Replay the data order on its own: the stop comes in the first step that ends with 20 or
    # more samples drawn, and the checkpoint is that step's start, so a resume redraws it.
    replay = MicroBatches(Data(n=40, bad=bad), collate, micro_batch_size=2, seed=1)
    stream, positions, bad_counts = iter(replay), [0], [0]
    while positions[-1] < 20:
        drawn = [next(stream) for _ in range(2)]
        positions.append(replay.position)
        bad_counts.append(bad_counts[-1] + sum(b["n_bad"] for b in drawn))
    stop_step = len(positions) - 2
    saved = checkpoint.latest_checkpoint(tmp_path)
    assert saved.name == f"step_{stop_step}"
    progress = json.loads((saved / "trainer_state" / "progress.json").read_text())
    assert progress["data_positions"] == [positions[-2]]
    assert (progress["samples_seen"], progress["bad_samples"]) == (positions[-2], bad_counts[-2])
    assert f"{bad_counts[-1]} of {positions[-1]} samples could not be used" in str(raised.value)
    # With data.max_bad_fraction raised, the run resumes at that step, redraws it, and its counts
    # go on as if it had never stopped.
    make_trainer(tmp_path, data=Data(n=40, bad=bad), extra=["data.max_bad_fraction=0.5", "train.max_steps=6"]).train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    while len(positions) < 7:
        drawn = [next(stream) for _ in range(2)]
        positions.append(replay.position)
        bad_counts.append(bad_counts[-1] + sum(b["n_bad"] for b in drawn))
    assert [(r["samples_seen"], r["bad_samples"]) for r in records] == list(zip(positions[1:], bad_counts[1:]))


def test_a_rank_with_only_bad_samples_stops_the_run(tmp_path):
    data = Data(n=4 * STARVED_AFTER, bad=range(4 * STARVED_AFTER))
    trainer = make_trainer(tmp_path, data=data, extra=["data.max_bad_fraction=1.0"])
    with pytest.raises(TooManyBadSamples, match=f"{STARVED_AFTER} micro-batches' worth of samples in a row"):
        trainer.train()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_0"


def test_few_bad_samples_are_skipped_and_counted(tmp_path, trainer_log):
    trainer = make_trainer(tmp_path, data=Data(n=40, bad={5}), extra=["data.max_bad_fraction=0.2"])
    last = trainer.train()
    # 8 steps x 4 samples = 32 usable samples of 39: sample 5 is drawn once in the first epoch.
    assert last["step"] == 8 and last["bad_samples"] == 1
    warnings = [r.getMessage() for r in trainer_log if r.levelno == logging.WARNING]
    assert warnings == ["rank 0: skipped a bad sample: img5.png: cannot identify image file"]
