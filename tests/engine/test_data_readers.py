"""Readers on small hand-written files of each format, and each of their error messages."""

import json
import re

import pytest

from pefomed.engine.data.readers import DataError, Sample, read_dataset

VQA_RAD = [
    {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
     "question_type": "PRES", "question": "Is there a mass?", "phrase_type": "test_freeform"},
    {"qid": 2, "image_name": "synpic2.jpg", "image_organ": "CHEST", "answer": "left lung", "answer_type": "OPEN",
     "question_type": "POS", "question": "Where is the mass?", "phrase_type": "freeform"},
    {"qid": 3, "image_name": "synpic2.jpg", "image_organ": "CHEST", "answer": 2, "answer_type": "OPEN ",
     "question_type": "COUNT", "question": "How many?", "phrase_type": "para"},
]


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_vqa_rad_combined_file_splits_by_phrase_type(tmp_path):
    path = write(tmp_path / "VQA_RAD Dataset Public.json", VQA_RAD)
    test = read_dataset("vqa_rad", path, "test")
    train = read_dataset("vqa_rad", path, "train")
    assert [s.meta["qid"] for s in test] == [1] and [s.meta["qid"] for s in train] == [2, 3]
    assert test[0] == Sample(str(tmp_path / "images" / "synpic1.jpg"), "vqa", "Is there a mass?", "Yes",
                             {"qid": 1, "answer_type": "CLOSED", "question_type": "PRES", "organ": "HEAD", "modality": ""})
    assert train[1].answer == "2" and train[1].meta["answer_type"] == "OPEN" and train[1].task == "vqa"


def test_vqa_rad_split_files_and_image_root(tmp_path):
    write(tmp_path / "trainset.json", VQA_RAD[1:])
    write(tmp_path / "testset.json", VQA_RAD[:1])
    assert len(read_dataset("vqa_rad", tmp_path, "train")) == 2  # no phrase_type filter on split files
    test = read_dataset("vqa_rad", tmp_path, "test", image_root=tmp_path / "imgs")
    assert test[0].image_path == str(tmp_path / "imgs" / "synpic1.jpg")


def test_slake_keeps_english_only(tmp_path):
    items = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
         "q_lang": "en", "location": "Chest", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
         "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "哪个器官不正常？", "answer": "肺", "q_lang": "zh",
         "location": "Chest", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ", "qid": 12},
    ]
    write(tmp_path / "test.json", items)
    (s,) = read_dataset("slake", tmp_path, "test")
    assert s.image_path == str(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    assert (s.question, s.answer, s.meta["organ"], s.meta["modality"], s.meta["question_type"]) == (
        "Which organ is abnormal?", "Lung", "Chest", "CT", "Organ")


def test_pathvqa_converted_json(tmp_path):
    write(tmp_path / "val.json", [
        {"qid": 5, "image_name": "val_0001", "answer": "no", "question": "is this benign?", "question_type": "yes/no"},
        {"qid": 6, "image_name": "val_0002.png", "answer": "mitosis", "answer_type": "other", "question": "what is shown?"},
    ])
    a, b = read_dataset("pathvqa", tmp_path, "val")
    assert a.image_path == str(tmp_path / "images" / "val" / "val_0001.jpg") and a.meta["answer_type"] == "CLOSED"
    assert b.image_path.endswith("val_0002.png") and b.meta["answer_type"] == "OTHER"


def test_caption_list(tmp_path):
    path = write(tmp_path / "roco_train.json", [{"image": "PMC1_fig.jpg", "caption": "CT of the abdomen. "}])
    (s,) = read_dataset("caption", path)
    assert (s.prompt_kind, s.question, s.answer) == ("caption", None, "CT of the abdomen.")
    assert s.image_path == str(tmp_path / "images" / "PMC1_fig.jpg")


def test_roco_captions_txt(tmp_path):
    folder = tmp_path / "data" / "test" / "radiology"
    write(folder / "captions.txt", "ROCO_00002\t Computed tomography of the chest.\n\nROCO_00003\tMRI brain.\n")
    samples = read_dataset("roco", tmp_path / "data", "test")
    assert [s.image_path for s in samples] == [str(folder / "images" / "ROCO_00002.jpg"), str(folder / "images" / "ROCO_00003.jpg")]
    assert samples[0].answer == "Computed tomography of the chest." and samples[0].meta["qid"] == "ROCO_00002"
    write(tmp_path / "bad" / "captions.txt", "ROCO_00002 no tab here\n")
    with pytest.raises(DataError, match=r"captions\.txt: line 1 has no TAB"):
        read_dataset("roco", tmp_path / "bad")
    with pytest.raises(DataError, match=r"none: dataset folder not found \(for split 'train'; ROCO keeps its splits in "
                                        r"such a folder as train/radiology/captions.txt, validation/radiology"):
        read_dataset("roco", tmp_path / "none", "train")


def test_r2gen_annotation_and_mimic_layouts(tmp_path):
    ann = {"train": [{"id": "CXR1_1_IM-0001", "report": "The heart is normal.", "split": "train",
                      "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"]}], "val": [], "test": []}
    path = write(tmp_path / "iu" / "annotation.json", ann)
    (s,) = read_dataset("iu_xray", tmp_path / "iu", "train")
    assert s.image_path == str(tmp_path / "iu" / "images" / "CXR1_1_IM-0001" / "0.png")
    assert (s.prompt_kind, s.answer, s.meta["qid"]) == ("report", "The heart is normal.", "CXR1_1_IM-0001")
    assert read_dataset("mimic", path, "val") == []
    flat = write(tmp_path / "mimic.json", {"p10/s1/a.jpg": ["No acute process.", "second reader"]})
    (m,) = read_dataset("mimic", flat, "train", image_root=tmp_path / "files")
    assert m.image_path == str(tmp_path / "files" / "p10/s1/a.jpg") and m.answer == "No acute process."
    with pytest.raises(DataError, match=r"annotation\.json: IU-Xray \(R2Gen annotation.json\) has no split 'dev'; its splits "
                                        r"are train, val, validation, test; the file holds the lists: test, train, val"):
        read_dataset("iu_xray", path, "dev")
    no_val = write(tmp_path / "iu2" / "annotation.json", {"train": ann["train"], "test": []})
    with pytest.raises(DataError, match=r"no 'val' list for split 'validation' \(expected keys train/val/test, found test, train\)"):
        read_dataset("iu_xray", no_val, "validation")
    write(tmp_path / "noimg.json", {"train": [{"id": "x", "report": "r"}]})
    with pytest.raises(DataError, match=r"noimg\.json: item 0 has no field 'image_path'"):
        read_dataset("iu_xray", tmp_path / "noimg.json", "train")


def test_errors_name_file_position_and_field(tmp_path):
    broken = write(tmp_path / "broken.json", '[{"image": "a.jpg",\n  "caption": }]')
    with pytest.raises(DataError, match=re.escape(f"{broken}: malformed JSON at line 2, column 14")):
        read_dataset("caption", broken)
    nofield = write(tmp_path / "nofield.json", [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}])
    with pytest.raises(DataError, match=re.escape(f"{nofield}: item 1 has no field 'caption'")):
        read_dataset("caption", nofield)
    empty = write(tmp_path / "empty.json", [{"qid": 1, "image_name": "a.jpg", "answer": " ", "answer_type": "OPEN",
                                             "question": "q", "phrase_type": "freeform"}])
    with pytest.raises(DataError, match="item 0 has an empty field 'answer'"):
        read_dataset("vqa_rad", empty, "train")
    with pytest.raises(DataError, match=r"item 0 has no field 'phrase_type'"):
        read_dataset("vqa_rad", write(tmp_path / "nophrase.json", [{"image_name": "a"}]), "test")
    with pytest.raises(DataError, match=r"expected the file to be a JSON list of items, found dict"):
        read_dataset("vqa_rad", write(tmp_path / "obj.json", {"a": 1}), "train")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'}: dataset folder not found (for split 'train'; "
                                                  "VQA-RAD keeps its splits in such a folder as trainset.json, testset.json)")):
        read_dataset("vqa_rad", tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="unknown dataset kind 'coco'"):
        read_dataset("coco", tmp_path)
    with pytest.raises(DataError, match="SLAKE has no split 'dev'; its splits are train, val, validation, test"):
        read_dataset("slake", tmp_path, "dev")
    with pytest.raises(ValueError, match="prompt_kind 'chat'"):
        Sample("a.png", "chat", None, "x")


def test_missing_image_is_not_checked_by_the_reader(tmp_path):
    """Images are opened lazily, per sample, by the dataset (a counted bad sample there)."""
    path = write(tmp_path / "caps.json", [{"image": "absent.jpg", "caption": "x"}])
    assert read_dataset("caption", path)[0].image_path.endswith("absent.jpg")
