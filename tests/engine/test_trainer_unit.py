"""The trainer and checkpoints on a toy model: fast, in-process, no ViT or LLM needed."""

import json

import pytest
import torch
from torch import nn

from pefomed.engine import checkpoint, distributed
from pefomed.engine.batches import MicroBatches
from pefomed.engine.config import load_config
from pefomed.engine.lora import freeze_except
from pefomed.engine.trainer import TooManyBadSamples, Trainer


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
        [f"train.output_dir={out}", "train.max_steps=8", "train.progress_bar=false", "optim.lr=0.05",
         "optim.warmup_steps=2", "train.grad_accum=2", "train.micro_batch_size=2", *extra],
    )
    torch.manual_seed(0)
    model = Toy()
    freeze_except(model, [n for n, _ in model.named_parameters() if "lora" in n or "connector" in n], log=None)
    batches = MicroBatches(data or Data(), collate, micro_batch_size=2, seed=1)
    return Trainer(config=cfg, model=model, batches=batches, env=distributed.init_distributed("cpu"), log=lambda *_: None)


def read_losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_is_normalized_by_target_tokens(tmp_path):
    trainer = make_trainer(tmp_path)
    micro = [next(iter(trainer.batches)) for _ in range(2)]
    loss_sum, n_tokens = trainer._accumulate(micro)
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


def test_resume_gives_identical_losses(tmp_path):
    full = tmp_path / "full"
    make_trainer(full).train()
    part = tmp_path / "part"
    make_trainer(part, extra=["train.save_every=3"]).train()
    # Forget everything after step 3, as if the run had been killed right after that save.
    for step in (6, 8):
        import shutil

        shutil.rmtree(part / "checkpoints" / f"step_{step}")
    make_trainer(part, extra=["train.save_every=3"]).train()
    assert read_losses(part) == read_losses(full)


def test_half_written_checkpoint_is_ignored(tmp_path):
    make_trainer(tmp_path, extra=["train.max_steps=2"]).train()
    (tmp_path / "checkpoints" / "step_5.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_7").mkdir()  # no COMPLETE marker: killed mid-rename
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_2"


def test_too_many_bad_samples_stops_after_saving(tmp_path):
    data = Data(n=40, bad=set(range(0, 40, 3)))  # a third of the files are broken
    trainer = make_trainer(tmp_path, data=data, extra=["data.max_bad_fraction=0.1", "train.max_steps=50"])
    with pytest.raises(TooManyBadSamples, match="cannot identify image file"):
        trainer.train()
    assert checkpoint.latest_checkpoint(tmp_path) is not None


def test_few_bad_samples_are_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, data=Data(n=40, bad={5}), extra=["data.max_bad_fraction=0.2"])
    last = trainer.train()
    assert last["step"] == 8 and last["bad_samples"] >= 1
