"""A stage-2 checkpoint is self-contained: evaluating or resuming it needs no stage-1 folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pefomed.engine.checkpoint import latest_checkpoint
from pefomed.engine.config import load_config
from pefomed.engine.data.sources import load_samples
from pefomed.engine.session import train_from_config
from pefomed.errors import UserError
from pefomed.evaluate.run import evaluate_checkpoint, load_eval_config, load_model_for_eval, predict

ROOT = Path(__file__).resolve().parents[2]


def stage_config(tmp_path: Path, out: str, extra: list[str]):
    data = tmp_path / "data"
    return load_config(ROOT / "configs/demo.yaml", [
        f"train.output_dir={tmp_path / out}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]", f"model.tokenizer={data}/tokenizer",
        "data.synthetic_train=40", "data.synthetic_test=6", "train.progress_bar=false",
        "train.micro_batch_size=4", "model.dtype=float32", *extra,
    ])  # fmt: skip


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or n.startswith("connector.")}


def test_stage2_checkpoint_evaluates_and_resumes_after_stage1_is_deleted(tmp_path):
    train_from_config(stage_config(tmp_path, "stage1", ["train.max_steps=3"]))
    stage1 = latest_checkpoint(tmp_path / "stage1")
    start_from = [f"model.projection_checkpoint={stage1}/projection.safetensors", f"model.adapter_checkpoint={stage1}"]
    stage2_cfg = lambda steps: stage_config(tmp_path, "stage2", [f"train.max_steps={steps}", *start_from])  # noqa: E731
    train_from_config(stage2_cfg(2))
    stage2 = latest_checkpoint(tmp_path / "stage2")

    # The checkpoint's config names no stage-1 file; where it started from is kept for provenance.
    saved_cfg = load_eval_config(stage2)
    assert saved_cfg.model.projection_checkpoint is None and saved_cfg.model.adapter_checkpoint is None
    progress = json.loads((stage2 / "trainer_state" / "progress.json").read_text())
    assert progress["init_from"] == {
        "model.projection_checkpoint": str((stage1 / "projection.safetensors").resolve()),
        "model.adapter_checkpoint": str(stage1.resolve()),
    }

    # Reference: the model as the stage-2 training config builds it (stage-1 files still there).
    samples = load_samples(saved_cfg.data.eval, saved_cfg)
    reference_model, tokenizer = load_model_for_eval(stage2_cfg(2), stage2)
    reference_state = trainable_state(reference_model)
    reference = [r["reply"] for r in predict(reference_model, tokenizer, samples, saved_cfg)]
    # Stage 2 did train on: its weights are not stage 1's.
    stage1_model, _ = load_model_for_eval(load_eval_config(stage1), stage1)
    assert any(not torch.equal(t, trainable_state(stage1_model)[n]) for n, t in reference_state.items())

    shutil.rmtree(tmp_path / "stage1")
    with pytest.raises((FileNotFoundError, UserError), match="stage1"):  # a config naming stage 1's files
        load_model_for_eval(stage2_cfg(2), stage2)
    model, tokenizer = load_model_for_eval(load_eval_config(stage2), stage2)
    state = trainable_state(model)
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[n], reference_state[n]) for n in state)
    assert [r["reply"] for r in predict(model, tokenizer, samples, saved_cfg)] == reference
    metrics = evaluate_checkpoint(load_eval_config(stage2), stage2, split="test", out_dir=tmp_path / "eval")
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert metrics["n"] == len(samples) and [json.loads(line)["reply"] for line in lines] == reference

    # Resuming stage 2 with its own command still works: its checkpoint replaces the stage-1 files.
    train_from_config(stage2_cfg(3))
    assert latest_checkpoint(tmp_path / "stage2").name == "step_3"
    steps = [json.loads(line)["step"] for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
