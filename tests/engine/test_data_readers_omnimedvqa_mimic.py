"""The OmniMedVQA and MIMIC-CXR readers on small files in each dataset's own layout.

OmniMedVQA (its release): `QA_information/Open-access/<dataset>.json` with `question_id`, `question`,
`option_A..D`, `gt_answer`, `modality_type`, `question_type`, `image_path: "Images/..."`.
MIMIC-CXR (PhysioNet): `mimic-cxr-2.0.0-split.csv.gz`, `mimic-cxr-2.0.0-metadata.csv.gz`, reports
`mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt`, images `files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`
(MIMIC-CXR-JPG) or `.dcm` (MIMIC-CXR).
"""

import gzip
import hashlib
import json
import logging

import pytest

from pefomed.engine.config import load_config
from pefomed.engine.data.readers import (
    DataError,
    mimic_report_target,
    omnimedvqa_split,
    read_dataset,
    report_sections,
)
from pefomed.engine.data.sources import load_samples
from pefomed.evaluate.score import score_predictions

ACRIMA = [
    {"dataset": "ACRIMA", "question_id": "ACRIMA_0000", "question_type": "Disease Diagnosis",
     "question": "What diagnosis is most likely for this fundus image?", "gt_answer": "Glaucoma",
     "image_path": "Images/ACRIMA/Im001_ACRIMA.jpg", "option_A": "Normal", "option_B": "Glaucoma",
     "option_C": "Cataract", "option_D": "Myopia", "modality_type": "Fundus Photography"},
    {"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis",
     "question": "Is there glaucoma?", "gt_answer": "yes", "image_path": "Images/ACRIMA/Im002_ACRIMA.jpg",
     "option_A": "No", "option_B": "Yes", "modality_type": "Fundus Photography"},
]
CHEST_CT = [
    {"dataset": "Chest CT Scan", "question_id": "Chest CT Scan_0000", "question_type": "Modality Recognition",
     "question": "What imaging modality was used?", "gt_answer": "CT", "image_path": "Images/Chest CT Scan/test/a/1.png",
     "option_A": "MR", "option_B": " CT ", "option_C": "X-Ray", "option_D": "", "modality": "CT(Computed Tomography)"},
]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def omni(tmp_path):
    qa = tmp_path / "OmniMedVQA" / "QA_information" / "Open-access"
    write(qa / "ACRIMA.json", ACRIMA)
    write(qa / "Chest CT Scan.json", "\n".join(json.dumps(item) for item in CHEST_CT) + "\n")  # JSON Lines
    write(tmp_path / "OmniMedVQA" / "QA_information" / "Restricted-access" / "AIDA.json", [{"image_path": "x"}])
    return tmp_path / "OmniMedVQA"


def test_omnimedvqa_multiple_choice_becomes_open_ended(omni):
    samples = read_dataset("omnimedvqa", omni, "all")
    assert [s.meta["qid"] for s in samples] == ["ACRIMA_0000", "ACRIMA_0001", "Chest CT Scan_0000"]
    first, yes, ct = samples
    assert first.question == "What diagnosis is most likely for this fundus image?" and first.answer == "Glaucoma"
    assert not any(option in first.question for option in ("Normal", "Cataract", "Myopia", "A.", "(A)"))
    assert first.image_path == str(omni / "Images" / "ACRIMA" / "Im001_ACRIMA.jpg")
    assert first.meta == {"qid": "ACRIMA_0000", "answer_type": "OPEN", "question_type": "Disease Diagnosis",
                          "organ": "", "modality": "Fundus Photography", "dataset": "ACRIMA"}
    # gt_answer "yes" is option B's text "Yes": the option's own text is the answer.
    assert (yes.answer, yes.meta["answer_type"]) == ("Yes", "CLOSED")
    assert (ct.answer, ct.meta["modality"], ct.prompt_kind) == ("CT", "CT(Computed Tomography)", "vqa")
    # The same items from the Open-access folder or from one file; image paths stay relative to the release.
    assert read_dataset("omnimedvqa", omni / "QA_information" / "Open-access", "all") == samples
    (only,) = read_dataset("omnimedvqa", omni / "QA_information" / "Open-access" / "Chest CT Scan.json", "all")
    assert only == ct


def test_omnimedvqa_splits_keep_an_images_questions_together(tmp_path):
    items = [{"question_id": f"q{i}", "question": f"question {i}?", "gt_answer": "a", "option_A": "a", "option_B": "b",
              "image_path": f"Images/set/{i // 3}.png", "modality_type": "MR"} for i in range(1200)]
    write(tmp_path / "QA_information" / "Open-access" / "set.json", items)
    splits = {name: read_dataset("omnimedvqa", tmp_path, name) for name in ("train", "val", "test", "all")}
    ids = {name: [s.meta["qid"] for s in found] for name, found in splits.items()}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == sorted(ids["all"]) and len(ids["all"]) == 1200
    for name in ("train", "val", "test"):
        for sample in splits[name]:
            # The rule, restated: SHA-256 of the image path, first 8 bytes big-endian, mod 100.
            bucket = int.from_bytes(hashlib.sha256(sample.image_path.split(str(tmp_path) + "/")[1].encode())
                                    .digest()[:8], "big") % 100
            assert name == ("train" if bucket < 80 else "val" if bucket < 90 else "test")
    images = {name: {s.image_path for s in found} for name, found in splits.items() if name != "all"}
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])
    assert 0.72 < len(images["train"]) / 400 < 0.88 and len(images["val"]) > 20 and len(images["test"]) > 20
    assert omnimedvqa_split("Images/set/0.png") in ("train", "val", "test")


def test_omnimedvqa_errors_and_a_gt_answer_that_is_no_option(tmp_path, omni, caplog):
    bad = write(tmp_path / "bad" / "QA_information" / "Open-access" / "x.json", [{**ACRIMA[0], "gt_answer": ""}])
    with pytest.raises(DataError, match=f"{bad}: item 0 has an empty field 'gt_answer'"):
        read_dataset("omnimedvqa", tmp_path / "bad", "all")
    with pytest.raises(DataError, match=r"OmniMedVQA has no split 'dev'; its splits are train, val, validation, test, all"):
        read_dataset("omnimedvqa", omni, "dev")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no OmniMedVQA QA files \(\*\.json\) there"):
        read_dataset("omnimedvqa", tmp_path / "empty", "all")
    odd = write(tmp_path / "odd.json", [{**ACRIMA[0], "gt_answer": "Retinal detachment"}])
    with caplog.at_level(logging.WARNING, logger="pefomed.engine.data.readers"):
        (sample,) = read_dataset("omnimedvqa", odd, "all")
    assert sample.answer == "Retinal detachment" and "1 items have a gt_answer that is none of their options" in caplog.text
    assert sample.image_path == str(tmp_path / "Images" / "ACRIMA" / "Im001_ACRIMA.jpg")


def test_omnimedvqa_scores_per_modality(omni):
    """`pefomed score` breaks exact match down by the modality the reader keeps."""
    cfg = load_config(None, [f"data.eval=[{{kind: omnimedvqa, path: {omni}, split: all}}]"])
    samples = load_samples(cfg.data.eval, cfg)
    predictions = ["glaucoma", "no", "CT"]  # right, wrong, right
    items = [{"question": s.question, "answer": s.answer, "prediction": p, "answer_type": s.meta["answer_type"],
              "modality": s.meta["modality"]} for s, p in zip(samples, predictions)]
    by_modality = score_predictions(items)["pefomed_exact_match"]["by_modality"]
    assert by_modality == {"CT(Computed Tomography)": {"n": 1, "accuracy": 1.0},
                           "Fundus Photography": {"n": 2, "accuracy": 0.5}}


# A MIMIC-CXR report file as released: header lines start with a space, blank lines hold one space.
REPORT = "\n".join([
    '                                 FINAL REPORT',
    ' EXAMINATION:  CHEST (PA AND LAT)',
    ' ',
    ' INDICATION:  ___F with new onset ascites  // eval for infection',
    ' ',
    ' TECHNIQUE:  Chest PA and lateral',
    ' ',
    ' COMPARISON:  None.',
    ' ',
    ' FINDINGS: ',
    ' ',
    ' There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral',
    ' nodular opacities that most likely represent nipple shadows.',
    ' ',
    ' IMPRESSION: ',
    ' ',
    ' No acute cardiopulmonary process.',
    '',
])


def test_report_sections_findings_and_impression():
    assert report_sections(REPORT) == {
        "findings": "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities "
                    "that most likely represent nipple shadows.",
        "impression": "No acute cardiopulmonary process."}
    assert mimic_report_target(REPORT) == ("There is no focal consolidation, pleural effusion or pneumothorax. "
                                           "Bilateral nodular opacities that most likely represent nipple shadows. "
                                           "No acute cardiopulmonary process.")
    combined = " FINAL REPORT\n INDICATION: cough.\n \n FINDINGS AND IMPRESSION:  Clear lungs.\n TIME: 10:30\n"
    assert report_sections(combined) == {"impression": "Clear lungs."}
    assert mimic_report_target(" EXAMINATION: CHEST\n CONCLUSION:  Stable.\n") == "Stable."
    assert mimic_report_target(" WET READ: ___ 10:30 AM\n  No pneumonia.\n") is None


def mimic_release(root):
    """Three studies: a train one with a lateral and a PA view (JPG), a validate one in DICOM, and a
    train one without a report; plus a train report that has neither findings nor impression."""
    rows = ["dicom_id,study_id,subject_id,split", "lat1,50414267,10000032,train", "pa1,50414267,10000032,train",
            "d2,53189527,10000898,validate", "x3,51111111,10000111,train", "x4,52222222,10000222,train"]
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
        f.write("dicom_id,subject_id,study_id,ViewPosition\nlat1,10000032,50414267,LATERAL\npa1,10000032,50414267,PA\n")
    reports = root / "mimic-cxr-reports" / "files"
    write(reports / "p10" / "p10000032" / "s50414267.txt", REPORT)
    write(root / "files" / "p10" / "p10000898" / "s53189527.txt", " FINDINGS: Heart size normal.\n")  # DICOM release
    write(reports / "p10" / "p10000222" / "s52222222.txt", " INDICATION: pain\n")
    for image in ("files/p10/p10000032/s50414267/lat1.jpg", "files/p10/p10000032/s50414267/pa1.jpg",
                  "files/p10/p10000898/s53189527/d2.dcm"):
        write(root / image, "")
    return root


def test_mimic_release_layout(tmp_path, caplog):
    root = mimic_release(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pefomed.engine.data.readers"):
        (train,) = read_dataset("mimic", root, "train")
    assert train.image_path == str(root / "files/p10/p10000032/s50414267/pa1.jpg")  # the PA view, not the lateral
    assert train.answer == mimic_report_target(REPORT) and train.prompt_kind == "report"
    assert train.meta == {"qid": "s50414267", "restricted": True}
    assert "1 of 3 train studies have no report file" in caplog.text
    assert "1 of 3 train reports have neither findings nor impression" in caplog.text
    (val,) = read_dataset("mimic", root, "validation")
    assert val.image_path == str(root / "files/p10/p10000898/s53189527/d2.dcm") and val.answer == "Heart size normal."
    assert read_dataset("mimic", root, "test") == []
    with pytest.raises(DataError, match="none of the 1 val studies has a report with findings or impression"):
        (root / "files/p10/p10000898/s53189527.txt").unlink()
        read_dataset("mimic", root, "val")


def test_mimic_is_restricted_in_every_layout_and_datasets_can_opt_in(tmp_path):
    ann = {"train": [{"id": "s1", "report": "Clear.", "image_path": ["p10/p10000032/s50414267/a.jpg"]}]}
    write(tmp_path / "r2gen" / "annotation.json", ann)
    write(tmp_path / "flat.json", {"p10/p10000032/s50414267/a.jpg": ["Clear."]})
    write(tmp_path / "caps" / "captions_train.json", [{"image": "a.jpg", "caption": "c"}])
    for path in (tmp_path / "r2gen", tmp_path / "flat.json"):
        assert all(s.meta["restricted"] for s in read_dataset("mimic", path, "train"))
    cfg = load_config(None, [f"data.train=[{{kind: mimic, path: {tmp_path / 'flat.json'}, restricted: false}}, "
                             f"{{kind: caption, path: {tmp_path / 'caps'}}}, "
                             f"{{kind: caption, path: {tmp_path / 'caps'}, restricted: true}}]"])
    mimic, open_caption, marked = load_samples(cfg.data.train, cfg)
    # restricted can only be added: a MIMIC dataset stays restricted whatever its spec says.
    assert mimic.meta["restricted"] is True and "restricted" not in open_caption.meta and marked.meta["restricted"]
    with pytest.raises(DataError, match=r"split\.csv\.gz: no column\(s\) \['split'\]"):
        bad = tmp_path / "bad"
        bad.mkdir()
        with gzip.open(bad / "mimic-cxr-2.0.0-split.csv.gz", "wt") as f:
            f.write("dicom_id,study_id,subject_id\na,1,2\n")
        read_dataset("mimic", bad, "train")
