"""Every reader reads the split it is asked for, from the file its dataset really uses for it, or
fails naming the split and the split files that are there."""

import json
import re
import shutil

import pytest

from pefomed.engine.config import DatasetSpec, load_config
from pefomed.engine.data import synthetic
from pefomed.engine.data.readers import DataError, read_dataset
from pefomed.engine.data.sources import load_samples

# The file each dataset's release uses for a split, from the datasets themselves (Slake1.0 ships
# validate.json, ROCO a validation/ folder, R2Gen's annotation.json a "val" list), not from the reader.
RELEASE_FILES = {
    "vqa_rad": {"train": "trainset.json", "test": "testset.json"},
    "synthetic": {"train": "trainset.json", "test": "testset.json"},
    "slake": {"train": "train.json", "val": "validate.json", "test": "test.json"},
    "pathvqa": {"train": "train.json", "val": "val.json", "test": "test.json"},
    "caption": {"train": "captions_train.json", "val": "captions_val.json", "test": "captions_test.json"},
    "roco": {"train": "train/radiology/captions.txt", "val": "validation/radiology/captions.txt",
             "test": "test/radiology/captions.txt"},
    "iu_xray": {"train": "train", "val": "val", "test": "test"},  # keys of annotation.json
    "mimic": {"train": "train", "val": "val", "test": "test"},
}
ASKED_AS = {"train": ["train"], "val": ["val", "validation"], "test": ["test"]}


def vqa_item(marker, phrase="freeform"):
    return {"qid": 1, "image_name": "a.jpg", "image_organ": "HEAD", "answer": marker, "answer_type": "OPEN",
            "question_type": "PRES", "question": "what?", "phrase_type": phrase}


def write_split(kind, root, key, marker):
    """One item whose answer (or caption, or report) is `marker`, in the file of split `key`."""
    rel = RELEASE_FILES[kind][key]
    if kind in ("iu_xray", "mimic"):
        path = root / "annotation.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[rel] = [{"id": marker, "report": marker, "image_path": ["a/0.png"], "split": rel}]
        path.write_text(json.dumps(data))
        return
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("vqa_rad", "synthetic"):
        items = [vqa_item(marker)]
    elif kind == "slake":
        items = [{"img_name": "x/source.jpg", "question": "what?", "answer": marker, "q_lang": "en"}]
    elif kind == "pathvqa":
        items = [{"image_name": "a", "question": "what?", "answer": marker}]
    elif kind == "caption":
        items = [{"image": "a.jpg", "caption": marker}]
    else:
        path.write_text(f"ROCO_00001\t{marker}\n")
        return
    path.write_text(json.dumps(items))


@pytest.mark.parametrize("kind", sorted(RELEASE_FILES))
def test_each_split_is_read_from_its_own_file(kind, tmp_path):
    for key in RELEASE_FILES[kind]:
        write_split(kind, tmp_path, key, f"from-{key}")
    for key in RELEASE_FILES[kind]:
        for asked in ASKED_AS[key]:
            assert [s.answer for s in read_dataset(kind, tmp_path, asked)] == [f"from-{key}"], (kind, asked)


@pytest.mark.parametrize("kind", sorted(RELEASE_FILES))
def test_a_missing_split_names_the_split_and_what_is_there(kind, tmp_path):
    keys = list(RELEASE_FILES[kind])
    for key in keys[:-1]:
        write_split(kind, tmp_path, key, key)
    missing = keys[-1]  # always "test"
    with pytest.raises(DataError) as err:
        read_dataset(kind, tmp_path, missing)
    message = str(err.value)
    assert f"'{missing}'" in message
    if kind in ("iu_xray", "mimic"):
        assert f"found {', '.join(sorted(keys[:-1]))}" in message
    else:
        assert message.startswith(f"{tmp_path}: no 'test' split of ")
        assert f"{RELEASE_FILES[kind]['test']} is not there" in message
        found = ", ".join(f"{key} ({RELEASE_FILES[kind][key]})" for key in keys[:-1])
        assert message.endswith(f"splits found in {tmp_path}: {found}")


@pytest.mark.parametrize("kind", ["vqa_rad", "synthetic"])
def test_vqa_rad_has_no_validation_split(kind, tmp_path):
    write_split(kind, tmp_path, "train", "x")
    write_split(kind, tmp_path, "test", "y")
    for asked in ("val", "validation", "dev"):
        with pytest.raises(DataError) as err:
            read_dataset(kind, tmp_path, asked)
        assert f"has no split '{asked}'; its splits are train, test; splits found in {tmp_path}: " \
               "train (trainset.json), test (testset.json)" in str(err.value)


def test_an_empty_folder_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError) as err:
        read_dataset("slake", tmp_path, "validation")
    assert str(err.value).endswith(f"no split file of SLAKE (train.json, validate.json, test.json) is there; "
                                   f"{tmp_path} holds: imgs/, notes.txt")


def test_a_file_whose_name_states_another_split_is_refused(tmp_path):
    write_split("slake", tmp_path, "test", "t")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'test.json'}: its name says it holds the 'test' split, "
                                                  "but split 'train' was asked for")):
        read_dataset("slake", tmp_path / "test.json", "train")
    assert [s.answer for s in read_dataset("slake", tmp_path / "test.json", "test")] == ["t"]
    roco_train = tmp_path / "roco_train.json"
    roco_train.write_text(json.dumps([{"image": "a.jpg", "caption": "c"}]))
    with pytest.raises(DataError, match="its name says it holds the 'train' split, but split 'val' was asked for"):
        read_dataset("caption", roco_train, "val")
    undeclared = tmp_path / "medicat.json"  # a name that does not say: the file is the split asked for
    shutil.copy(roco_train, undeclared)
    assert len(read_dataset("caption", undeclared, "test")) == 1
    # a VQA-RAD split file given directly is read whole; the combined release is split by phrase_type
    (tmp_path / "testset.json").write_text(json.dumps([vqa_item("a", "freeform")]))
    assert [s.answer for s in read_dataset("vqa_rad", tmp_path / "testset.json", "test")] == ["a"]
    with pytest.raises(DataError, match="its name says it holds the 'test' split, but split 'train'"):
        read_dataset("vqa_rad", tmp_path / "testset.json", "train")


def test_roco_split_folder_given_directly(tmp_path):
    for key in ("train", "test"):
        write_split("roco", tmp_path, key, key)
    folder = tmp_path / "test" / "radiology"
    assert [s.answer for s in read_dataset("roco", folder, "test")] == ["test"]
    assert [s.answer for s in read_dataset("roco", tmp_path / "test", "test")] == ["test"]
    assert [s.answer for s in read_dataset("roco", folder / "captions.txt", "test")] == ["test"]
    with pytest.raises(DataError, match="its name says it holds the 'test' split, but split 'train' was asked for"):
        read_dataset("roco", folder, "train")


def test_mimic_report_map_is_one_split(tmp_path):
    flat = tmp_path / "mimic_test.json"
    flat.write_text(json.dumps({"p10/s1/a.jpg": ["No acute process."]}))
    assert [s.answer for s in read_dataset("mimic", flat, "test")] == ["No acute process."]
    with pytest.raises(DataError, match="its name says it holds the 'test' split, but split 'train'"):
        read_dataset("mimic", flat, "train")
    with pytest.raises(DataError, match="MIMIC-CXR has no split 'dev'"):
        read_dataset("mimic", flat, "dev")


def test_load_samples_reads_the_split_named_and_refuses_a_missing_one(tmp_path):
    """What `pefomed eval --split X` runs: the config's datasets at split X."""
    root = tmp_path / "demo"
    synthetic.generate(root, n_train=9, n_test=4, image_size=16, seed=1)
    cfg = load_config(None, [f"data.train=[{{kind: synthetic, path: {root}}}]", "model.vision=tiny", "model.image_size=16",
                             "model.group=1"])
    test = load_samples([DatasetSpec("synthetic", str(root), "test")], cfg)
    assert [s.question for s in test] == [item["question"] for item in json.loads((root / "testset.json").read_text())]
    assert all("synpic_test_" in s.image_path for s in test)
    with pytest.raises(DataError) as err:
        load_samples([DatasetSpec("synthetic", str(root), "val")], cfg)
    assert "has no split 'val'" in str(err.value) and "trainset.json" in str(err.value) and "testset.json" in str(err.value)
    (root / "captions_empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"captions_empty\.json: the 'train' split of caption holds no samples"):
        load_samples([DatasetSpec("caption", str(root / "captions_empty.json"), "train")], cfg)
    with pytest.raises(DataError, match="no dataset to read"):
        load_samples([], cfg)
