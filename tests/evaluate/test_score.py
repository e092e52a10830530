"""evaluate.score end to end, the predictions schema and the report writers."""

import json
import struct
import zlib

import pytest

from pefomed.evaluate.predictions import (
    PredictionsError,
    read_predictions,
    validate_items,
    write_predictions,
)
from pefomed.evaluate.report import json_safe, write_outputs
from pefomed.evaluate.score import main, score_items, score_predictions

ITEMS = [
    {"qid": 1, "question": "is it?", "answer": "yes", "prediction": "Yes.", "answer_type": "CLOSED",
     "modality": "XR", "organ": "CHEST", "question_type": "PRES"},
    {"qid": 2, "question": "is it?", "answer": "yes", "prediction": "no, it is not", "answer_type": "CLOSED",
     "modality": "XR", "organ": "CHEST", "question_type": "PRES"},
    {"qid": 3, "question": "is it?", "answer": "no", "prediction": "normal", "answer_type": "closed",
     "modality": "MRI", "organ": "HEAD", "question_type": "ABN"},
    {"qid": 4, "question": "where?", "answer": "left lung", "prediction": "the left lung", "answer_type": "OPEN",
     "modality": "MRI", "organ": "CHEST", "question_type": "POS"},
    {"qid": 5, "question": "what?", "answer": "mass", "prediction": "there is a mass", "answer_type": "OPEN",
     "modality": "CT", "organ": "ABD", "question_type": "ABN"},
]
REPORTS = [
    {"qid": "r1", "answer": "The heart size is normal. No pleural effusion.", "task": "report",
     "prediction": "Heart size is normal, no effusion."},
    {"qid": "r2", "answer": ["No acute cardiopulmonary process.", "Lungs are clear."], "task": "report",
     "prediction": "No acute cardiopulmonary abnormality."},
]


def png_ok(path) -> bool:
    """A PNG whose signature, IHDR and IEND are in place and whose chunk CRCs check out."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        kinds.append(kind)
        pos += 12 + length
    width, height = struct.unpack(">II", data[16:24])
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds and width > 100 and height > 100


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_end_to_end(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "preds.jsonl", ITEMS + REPORTS)
    out = tmp_path / "out"
    metrics = main(["--predictions", str(preds), "--out", str(out), "--report-tokenizer", "python", "--no-meteor"])
    pe = metrics["pefomed_exact_match"]
    # closed: "Yes." == yes; "no, it is not" != yes; "normal" != no. open: both normalize differently
    # except "the left lung" -> "left lung".
    assert (pe["closed"], pe["open"], pe["overall"]) == (pytest.approx(1 / 3), 0.5, 0.4)
    assert pe["by_modality"]["MRI"] == {"n": 2, "accuracy": 0.5}
    assert pe["by_question_type"]["ABN"] == {"n": 2, "accuracy": 0.0}
    lm = metrics["llava_med"]
    assert lm["closed_accuracy"] == pytest.approx(2 / 3)  # "normal" contains "no": a LLaVA-Med hit
    assert lm["open_recall"] == 1.0
    assert metrics["med_idefics"]["containment_em"] == pytest.approx(4 / 5)
    assert metrics["report_metrics"]["n"] == 2 and metrics["report_metrics"]["meteor"] is None
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["pefomed_exact_match"]["overall"] == 0.4 and saved["n_report"] == 2
    report = (out / "report.md").read_text()
    assert "| PeFoMed exact match (VQA normalization) | 0.3333 | 0.5000 | 0.4000 |" in report
    assert "--llava-med-compat" in report and "# Report generation" in report
    assert "## PeFoMed exact match by modality" in report
    for name in ("accuracy_by_answer_type.png", "accuracy_by_modality.png"):
        assert png_ok(out / name)
    rows = [json.loads(line) for line in (out / "scored_items.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[0]["scores"]["pefomed_exact_match"] is True
    assert rows[2]["scores"]["llava_med_closed_hit"] == 1.0 and rows[2]["answer_type"] == "CLOSED"
    assert "overall 0.4000" in capsys.readouterr().out


def test_llava_med_compat_flag_in_cli(tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", ITEMS)
    fixed = main(["--predictions", str(preds), "--out", str(tmp_path / "a")])
    compat = main(["--predictions", str(preds), "--out", str(tmp_path / "b"), "--llava-med-compat"])
    assert fixed["llava_med"]["closed_accuracy"] == pytest.approx(2 / 3)
    assert compat["llava_med"]["closed_accuracy"] == 1.0 and compat["llava_med"]["n_closed_dropped"] == 1
    assert "This run uses `--llava-med-compat`: 1 wrong yes/no" in (tmp_path / "b" / "report.md").read_text()


def test_references_file_joins_by_qid(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"qid": 7, "prediction": "yes"}, {"qid": 8, "prediction": "2"}])
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([{"qid": 7, "answer": "yes", "answer_type": "CLOSED", "modality": "CT"},
                                {"qid": 8, "answer": ["two", "2 cm"], "answer_type": "OPEN"}]))
    metrics = main(["--predictions", str(preds), "--references", str(refs), "--out", str(tmp_path / "o")])
    assert metrics["pefomed_exact_match"]["closed"] == 1.0 and metrics["pefomed_exact_match"]["open"] == 1.0
    refs.write_text(json.dumps({"7": "no", "8": {"answer": "3", "answer_type": "OPEN"}}))
    items = read_predictions(preds, refs)
    assert items[0]["answer"] == "no" and items[1]["answer_type"] == "OPEN"


@pytest.mark.parametrize("content, message", [
    ('{"answer": "yes"}\n', "line 1: field 'prediction' must be a string"),
    ('\n{"prediction": "yes"}\n', "line 2: no field 'answer'"),
    ("{not json\n", "line 1 is not valid JSON"),
    ('{"prediction": "a", "answer": "a", "answer_type": "MAYBE"}\n', "'answer_type' must be CLOSED or OPEN"),
    ('{"prediction": "a", "answer": "a", "task": "caption"}\n', "field 'task' must be one of vqa, report"),
    ('{"prediction": "a", "answer": []}\n', "as a list must hold one or more strings"),
    ("[1, 2]\n", "line 1: an item is a JSON object"),
    ("\n", "no items to score"),
])
def test_bad_predictions_files(tmp_path, content, message):
    bad = tmp_path / "p.jsonl"
    bad.write_text(content)
    with pytest.raises(PredictionsError, match=message) as err:
        read_predictions(bad)
    assert str(bad) in str(err.value)


def test_cli_errors_exit_2_with_one_line(tmp_path, cli):
    code, _, err = cli("score", "--predictions", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert code == 2 and err == f"error: {tmp_path / 'missing.jsonl'}: predictions file not found\n"
    preds = write_jsonl(tmp_path / "p.jsonl", [{"qid": 1, "prediction": "yes"}])
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"2": "yes"}))
    code, _, err = cli("score", "--predictions", preds, "--references", refs, "--out", tmp_path / "o")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {preds}: item 1 (qid 1) has no 'answer' and no entry in the references")
    refs.write_text("{oops")
    code, _, err = cli("score", "--predictions", preds, "--references", refs, "--out", tmp_path / "o")
    assert code == 2 and err.startswith(f"error: {refs}: not valid JSON") and len(err.splitlines()) == 1


def test_write_predictions_round_trip(tmp_path):
    path = write_predictions(tmp_path / "sub" / "p.jsonl", ITEMS)
    assert read_predictions(path)[3]["answer"] == "left lung"
    assert validate_items(ITEMS)[2]["answer_type"] == "CLOSED"


def test_python_api_and_nan_in_json(tmp_path):
    metrics, per_item = score_items(ITEMS[:2])  # no OPEN item: open accuracy is NaN
    assert metrics["pefomed_exact_match"]["n_open"] == 0 and json_safe(metrics)["pefomed_exact_match"]["open"] is None
    assert len(per_item) == 2 and "correct" not in metrics["pefomed_exact_match"]
    paths = write_outputs(metrics, tmp_path / "o")
    assert [p.name for p in paths] == ["metrics.json", "report.md", "accuracy_by_answer_type.png",
                                       "accuracy_by_modality.png"]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["pefomed_exact_match"]["open"] is None
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| PeFoMed exact match (VQA normalization) | 0.5000 | n/a | 0.5000 |" in report
    reports_only = score_predictions(REPORTS, report_tokenizer="python", with_meteor=False)
    assert "pefomed_exact_match" not in reports_only and write_outputs(reports_only, tmp_path / "r")[2:] == []
