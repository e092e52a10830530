"""`pefomed demo` end to end at tiny size (configs/demo.yaml: random tiny LLaMA and ViT): data
generated, trained, evaluated three ways, the summary written; checked against the files."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pefomed.engine.checkpoint import VISION_FILE, latest_checkpoint
from pefomed.engine.config import load_config
from pefomed.evaluate import score
from pefomed.train import demo

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("trained model", "same model, swapped images", "majority answer")


def tiny(tmp_path: Path) -> list[str]:
    data = tmp_path / "data"
    return [
        f"train.output_dir={tmp_path / 'run'}",
        # the questions and, mixed in, the captions of the same images
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}, {{kind: caption, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]",
        f"model.tokenizer={data}/tokenizer",
        "data.synthetic_train=48", "data.synthetic_test=12", "model.image_size=32",
        "train.max_steps=3", "train.micro_batch_size=4", "train.save_every=0", "train.progress_bar=false",
        "lora.dropout=0.0", "eval.max_new_tokens=3", "eval.batch_size=16",
        # the recipe's engine options, at tiny size
        "model.connector_init=match_embeddings", "optim.connector_lr=5e-3", "model.train_vision=true",
        f"align.data=[{{kind: caption, path: {data}, split: train}}]", "align.steps=4", "align.batch_size=8",
    ]


def exact_match(records: list[dict]) -> float:
    """Overall exact match, recomputed here: reference and prediction compared after lowercasing."""
    return sum(r["prediction"].strip().lower() == r["answer"].strip().lower() for r in records) / len(records)


def majority(data: Path) -> float:
    """The majority-answer baseline from the dataset files: one answer per answer type."""
    train = json.loads((data / "trainset.json").read_text())
    test = json.loads((data / "testset.json").read_text())
    best = {t: Counter(q["answer"].lower() for q in train if q["answer_type"] == t).most_common(1)[0][0]
            for t in {q["answer_type"] for q in train}}
    return sum(best[q["answer_type"]] == q["answer"].lower() for q in test) / len(test)


@pytest.mark.parametrize("family", ["radiology", "shapes"])
def test_demo_trains_and_evaluates_three_ways(tmp_path, monkeypatch, family, capsys):
    monkeypatch.chdir(ROOT)
    summary = demo.main(["--config", "configs/demo.yaml", "--family", family, *tiny(tmp_path)])
    suffix = "" if family == "radiology" else "_shapes"
    run, data = tmp_path / f"run{suffix}", tmp_path / f"data{suffix}"
    assert json.loads((data / "dataset.json").read_text())["family"] == family
    assert json.loads((run / "eval" / "demo_summary.json").read_text()) == json.loads(json.dumps(summary))

    assert summary["family"] == family and summary["llm"] == "tiny"
    assert (latest_checkpoint(run) / VISION_FILE).is_file()  # the trained ViT, which evaluation loaded
    assert summary["command"].startswith(f"pefomed demo --config configs/demo.yaml --family {family} ")
    assert 0 < summary["train_wall_s"] <= summary["total_wall_s"] and 0 < summary["train_cpu_s"] <= summary["total_cpu_s"]
    assert {"processor", "cpus", "torch", "date"} <= summary["machine"].keys()
    n_test = len(json.loads((data / "testset.json").read_text()))
    for row in ROWS:
        assert {"closed", "open", "overall"} <= summary[row].keys()

    # The two model evaluations ran on every held-out question, the swapped one with other images.
    model = [json.loads(x) for x in (run / "eval" / "model" / "predictions.jsonl").read_text().splitlines()]
    swapped = [json.loads(x) for x in (run / "eval" / "swapped" / "predictions.jsonl").read_text().splitlines()]
    assert len(model) == len(swapped) == n_test
    assert [r["question"] for r in model] == [r["question"] for r in swapped]
    assert summary["trained model"]["overall"] == pytest.approx(exact_match(model))
    assert summary["same model, swapped images"]["overall"] == pytest.approx(exact_match(swapped))
    assert summary["majority answer"]["overall"] == pytest.approx(majority(data))
    assert [e["question"] for e in summary["examples"]] == [r["question"] for r in model[: demo.N_EXAMPLES]]
    out = capsys.readouterr().out
    assert f"on the synthetic {family} family" in out and "same model, swapped images" in out
    assert "pefomed ask --checkpoint" in out
    # the scorer the summary used agrees with the files as written
    assert score.score_file(run / "eval" / "model" / "predictions.jsonl", tmp_path / "rescored")[
        "pefomed_exact_match"]["overall"] == pytest.approx(exact_match(model))


def test_for_family_moves_the_synthetic_data_and_the_run():
    cfg = load_config(ROOT / "configs/demo_smollm2.yaml")
    assert demo.for_family(cfg, "radiology") is cfg
    shapes = demo.for_family(cfg, "shapes")
    assert shapes.data.synthetic_family == "shapes"
    assert [s.path for s in shapes.data.train] == ["data/demo_smollm2_shapes"]
    assert [s.path for s in shapes.data.eval] == ["data/demo_smollm2_shapes"]
    assert shapes.train.output_dir == "runs/demo_smollm2_shapes"
    assert cfg.train.output_dir == "runs/demo_smollm2"  # the loaded config is left as it was


def test_the_recipe_config_loads_with_its_engine_options():
    cfg = load_config(ROOT / "configs/demo_smollm2.yaml")
    assert (cfg.model.connector_init, cfg.optim.connector_lr, cfg.optim.lr) == ("match_embeddings", 2e-4, 2e-4)
    assert cfg.align.steps == 1500 and [s.kind for s in cfg.align.data] == ["caption"]
    assert cfg.model.train_vision and cfg.model.vision == "tiny"  # a random tower: the demo trains it
    assert cfg.data.template == cfg.eval.prompt == "smollm2" and not cfg.model.random_init
    assert demo.DEFAULT_CONFIG == "configs/demo_smollm2.yaml"


def test_a_missing_smollm2_folder_names_the_fix(tmp_path):
    with pytest.raises(demo.DemoError, match=r"model\.llm=.*nowhere: no config\.json there; build SmolLM2.*make smollm2"):
        demo.main(["--config", str(ROOT / "configs/demo_smollm2.yaml"), f"model.llm={tmp_path / 'nowhere'}"])
