"""Image paths in a dataset file that lead outside its image folder are refused by every reader,
unless data.allow_outside_root is set; symbolic links are resolved first."""

import json
import os
import re

import pytest

from pefomed.engine.config import load_config
from pefomed.engine.data.readers import DataError, read_dataset
from pefomed.engine.data.sources import load_samples


def dataset_naming(kind, root, name):
    """A one-item dataset of `kind` in `root` whose image is `name`: (path to pass, dataset file,
    where in it, field, image folder)."""
    vqa = {"qid": 1, "answer": "yes", "answer_type": "CLOSED", "question": "q?", "phrase_type": "freeform"}
    if kind in ("vqa_rad", "synthetic"):
        file = root / "trainset.json"
        file.write_text(json.dumps([{**vqa, "image_name": name}]))
        return root, file, "item 0", "image_name", root / "images"
    if kind == "slake":
        file = root / "train.json"
        file.write_text(json.dumps([{**vqa, "img_name": name}]))
        return root, file, "item 0", "img_name", root / "imgs"
    if kind == "pathvqa":
        file = root / "train.json"
        file.write_text(json.dumps([{**vqa, "image_name": name}]))
        return root, file, "item 0", "image_name", root / "images" / "train"
    if kind == "caption":
        file = root / "captions_train.json"
        file.write_text(json.dumps([{"image": name, "caption": "c"}]))
        return root, file, "item 0", "image", root / "images"
    if kind == "roco":
        file = root / "train" / "radiology" / "captions.txt"
        file.parent.mkdir(parents=True)
        file.write_text(f"{name}\tcaption\n")
        return root, file, "line 1", "image id", file.parent / "images"
    if kind in ("iu_xray", "mimic"):
        file = root / "annotation.json"
        file.write_text(json.dumps({"train": [{"id": "s", "report": "r", "image_path": [name]}]}))
        return root, file, "item 0 of 'train'", "image_path", root / "images"
    raise AssertionError(kind)


KINDS = ["vqa_rad", "synthetic", "slake", "pathvqa", "caption", "roco", "iu_xray", "mimic"]


@pytest.mark.parametrize("kind", KINDS)
def test_dot_dot_is_refused_by_every_reader_and_allowed_on_request(kind, tmp_path):
    path, file, where, field, images = dataset_naming(kind, tmp_path, "../../../etc/passwd.png")
    with pytest.raises(DataError) as err:
        read_dataset(kind, path, "train")
    message = str(err.value)
    assert message.startswith(f"{file}: {where} field {field!r} is '../../../etc/passwd")
    assert f"leads outside the image folder {images} ('..' climbs out of it" in message
    assert message.endswith("or set data.allow_outside_root: true if the dataset points outside its folder on purpose")
    (sample,) = read_dataset(kind, path, "train", allow_outside_root=True)
    assert sample.image_path.startswith(str(images / "../../../etc/passwd"))


@pytest.mark.parametrize("kind", ["caption", "mimic"])
def test_absolute_paths_are_refused(kind, tmp_path):
    if kind == "mimic":
        file = tmp_path / "reports.json"
        file.write_text(json.dumps({"/etc/passwd": ["r"]}))
        where, field = "entry 0", "image path (the key)"
    else:
        file = tmp_path / "caps.json"
        file.write_text(json.dumps([{"image": "ok.png", "caption": "c"}, {"image": "/etc/passwd", "caption": "c"}]))
        where, field = "item 1", "image"
    with pytest.raises(DataError, match=re.escape(f"{file}: {where} field {field!r} is '/etc/passwd', which leads "
                                                  f"outside the image folder") + r".*\(an absolute path, to /etc/passwd\)"):
        read_dataset(kind, file, "train")
    assert read_dataset(kind, file, "train", allow_outside_root=True)[-1].image_path == "/etc/passwd"


def test_symbolic_links_are_resolved(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(b"x")
    data = tmp_path / "data"
    (data / "images" / "sub").mkdir(parents=True)
    os.symlink(elsewhere / "secret.png", data / "images" / "link.png")
    caps = data / "captions_train.json"
    caps.write_text(json.dumps([{"image": "link.png", "caption": "c"}]))
    with pytest.raises(DataError, match=r"item 0 field 'image' is 'link.png', which leads outside the image folder .*"
                                        r"\(a symbolic link leads out of it, to .*elsewhere/secret.png\)"):
        read_dataset("caption", data)
    # a name with '..' that stays inside is fine, and so is an image folder that is itself a link
    caps.write_text(json.dumps([{"image": "sub/../a.png", "caption": "c"}]))
    assert read_dataset("caption", data)[0].image_path == str(data / "images" / "sub/../a.png")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(elsewhere, linked / "images")
    (linked / "captions_train.json").write_text(json.dumps([{"image": "secret.png", "caption": "c"}]))
    assert read_dataset("caption", linked)[0].image_path == str(linked / "images" / "secret.png")


def test_image_root_is_the_folder_checked(tmp_path):
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([{"image": "../pool/shared/a.png", "caption": "c"}]))
    with pytest.raises(DataError, match=re.escape(f"outside the image folder {tmp_path / 'pool' / 'imgs'}")):
        read_dataset("caption", caps, image_root=tmp_path / "pool" / "imgs")
    (sample,) = read_dataset("caption", caps, image_root=tmp_path / "pool")  # pool/../pool/shared is inside pool
    assert sample.image_path == str(tmp_path / "pool" / "../pool/shared/a.png")


def test_the_config_flag_reaches_the_readers(tmp_path):
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([{"image": "../outside.png", "caption": "c"}]))
    spec = f"data.train=[{{kind: caption, path: {caps}}}]"
    assert load_config(None, [spec]).data.allow_outside_root is False
    with pytest.raises(DataError, match="data.allow_outside_root: true"):
        load_samples(load_config(None, [spec]).data.train, load_config(None, [spec]))
    cfg = load_config(None, [spec, "data.allow_outside_root=true"])
    assert [s.image_path for s in load_samples(cfg.data.train, cfg)] == [str(tmp_path / "images" / "../outside.png")]
