import json

import pytest

from evaluate.llava_med import closed_hit, llava_med_scores, open_recall
from evaluate.score import main, read_predictions

ITEMS = [
    {"question": "is it?", "answer": "yes", "prediction": "yes", "answer_type": "CLOSED", "modality": "XR"},
    {"question": "is it?", "answer": "yes", "prediction": "no, it is not", "answer_type": "CLOSED", "modality": "XR"},
    {"question": "is it?", "answer": "no", "prediction": "maybe", "answer_type": "CLOSED", "modality": "MRI"},
    {"question": "where?", "answer": "left lung", "prediction": "the left side", "answer_type": "OPEN", "modality": "MRI"},
]


def test_llava_med_fix_and_compat():
    fixed = llava_med_scores(ITEMS)
    compat = llava_med_scores(ITEMS, compat=True)
    assert fixed["closed_accuracy"] == pytest.approx(1 / 3)  # the wrong "no" counts as 0
    assert compat["closed_accuracy"] == pytest.approx(1 / 2)  # their script drops it
    assert compat["n_closed_counted"] == 2 and fixed["n_closed_counted"] == 3
    assert open_recall("the left side", "left lung") == 0.5
    assert open_recall("left left", "left lung") == pytest.approx(2 / 3)  # tp counts the prediction's repeats
    assert closed_hit("no", "yes", compat=True) is None and closed_hit("no", "yes") == 0.0


def test_cli_writes_metrics_report_and_charts(tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    metrics = main(["--predictions", str(preds), "--out", str(tmp_path / "out")])
    assert metrics["pefomed_exact_match"]["closed"] == pytest.approx(1 / 3)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) == {"pefomed_exact_match", "llava_med", "med_idefics"}
    assert "| PeFoMed exact match" in (tmp_path / "out" / "report.md").read_text()
    for name in ("accuracy_by_answer_type.png", "accuracy_by_modality.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_predictions_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"answer": "yes"}\n')
    with pytest.raises(ValueError, match="line 1 has no field 'prediction'"):
        read_predictions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        read_predictions(bad)


def test_report_items_get_report_metrics(tmp_path):
    preds = tmp_path / "preds.jsonl"
    rows = ITEMS + [{"answer": "no acute process.", "prediction": "no acute process.", "task": "report"}]
    preds.write_text("".join(json.dumps(it) + "\n" for it in rows))
    metrics = main(["--predictions", str(preds), "--out", str(tmp_path / "out")])
    assert metrics["report_metrics"]["n"] == 1 and metrics["pefomed_exact_match"]["n"] == 4
    assert "Report metrics" in (tmp_path / "out" / "report.md").read_text()


def test_references_file_fills_answers(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"qid": 7, "prediction": "yes", "answer_type": "CLOSED"}) + "\n")
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"7": "yes"}))
    metrics = main(["--predictions", str(preds), "--references", str(refs), "--out", str(tmp_path / "o")])
    assert metrics["pefomed_exact_match"]["closed"] == 1.0
