"""evaluate.run on the synthetic dataset with a tiny model trained for a few steps."""

import json
from pathlib import Path

import pytest

from pefomed.engine.config import load_config
from pefomed.engine.session import train_from_config
from pefomed.evaluate.run import (
    evaluate_checkpoint,
    image_derangement,
    load_model_for_eval,
    majority_baseline,
    predict,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = root / "data"
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/demo.yaml", [
        f"train.output_dir={root / 'run'}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]", f"model.tokenizer={data}/tokenizer",
        "data.synthetic_train=60", "data.synthetic_test=18", "train.max_steps=3", "train.progress_bar=false",
        "train.micro_batch_size=4",
    ])
    train_from_config(cfg)
    return cfg, root


def test_predictions_and_metrics_written(trained, tmp_path):
    cfg, root = trained
    metrics = evaluate_checkpoint(cfg, root / "run", split="test", out_dir=tmp_path)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 18 == metrics["n"]
    record = json.loads(lines[0])
    assert {"question", "answer", "prediction", "reply", "answer_type"} <= record.keys()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["pefomed_exact_match"]["n"] == 18 and "med_idefics" in saved
    assert (tmp_path / "report.md").exists()


def test_batched_generation_equals_one_by_one(trained):
    cfg, root = trained
    from pefomed.engine.data.sources import load_samples

    samples = load_samples(cfg.data.eval, cfg)[:6]
    model, tok = load_model_for_eval(cfg, resolve_checkpoint(root / "run"))
    batched = [r["reply"] for r in predict(model, tok, samples, cfg, batch_size=6)]
    single = [r["reply"] for r in predict(model, tok, samples, cfg, batch_size=1)]
    assert batched == single


def test_swapped_images_are_a_derangement():
    paths = [f"img{i % 5}.png" for i in range(15)]
    mapping = image_derangement(paths, seed=1)
    assert all(mapping[p] != p for p in set(paths))
    assert sorted(mapping.values()) == sorted(set(paths))
    assert mapping == image_derangement(paths, seed=1)


def test_majority_baseline(trained):
    cfg, _ = trained
    from pefomed.engine.data.sources import load_samples

    train = load_samples(cfg.data.train, cfg)
    test = load_samples(cfg.data.eval, cfg)
    m = majority_baseline(train, test)
    assert 0.0 <= m["closed"] <= 1.0 and m["n"] == len(test)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        resolve_checkpoint(tmp_path)


def test_ask_png_and_dicom(trained, capsys):
    pydicom = pytest.importorskip("pydicom")
    from pefomed.evaluate.ask import main

    _, root = trained
    png = next((root / "data" / "images").glob("*.png"))
    assert main(["--checkpoint", str(root / "run"), "--image", str(png), "--question", "how many lesions are there?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    from PIL import Image

    jpg = png.with_suffix(".jpg")
    Image.open(png).convert("RGB").save(jpg, quality=95)
    assert main(["--checkpoint", str(root / "run"), "--image", str(jpg), "--question", "what organ is shown in this image?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    dcm = pydicom.data.get_testdata_file("CT_small.dcm")
    assert main(["--checkpoint", str(root / "run"), "--image", dcm, "--report", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_ask_errors_exit_2(trained, tmp_path, capsys):
    from pefomed.evaluate.ask import main

    _, root = trained
    broken = tmp_path / "scan.png"
    broken.write_bytes(b"garbage")
    assert main(["--checkpoint", str(root / "run"), "--image", str(broken), "--question", "q?"]) == 2
    assert "scan.png" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--image", str(broken), "--question", "q?"]) == 2
    assert "checkpoint" in capsys.readouterr().err
