import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.data import synthetic
from engine.data.collate import VLMDataset, collate, generation_batch
from engine.data.images import CLIP_MEAN, CLIP_STD, ImageLoadError, dicom_to_uint8, load_image
from engine.data.prompts import build_prompt
from engine.data.readers import DataError, read_dataset
from engine.data.tokenizer import build_demo_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    synthetic.generate(root, n_train=90, n_test=30, image_size=32, seed=3)
    build_demo_tokenizer(synthetic.corpus(root), root / "tokenizer")
    return root


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.generate(a, n_train=30, n_test=9, image_size=32, seed=7)
    synthetic.generate(b, n_train=30, n_test=9, image_size=32, seed=7)
    assert digest(a) == digest(b)
    synthetic.generate(tmp_path / "c", n_train=30, n_test=9, image_size=32, seed=8)
    assert digest(a) != digest(tmp_path / "c")


def test_answers_are_balanced(tmp_path):
    synthetic.generate(tmp_path, n_train=1500, n_test=3, image_size=16, seed=0)
    items = json.loads((tmp_path / "trainset.json").read_text())
    closed = Counter(i["answer"] for i in items if i["answer_type"] == "CLOSED")
    assert 0.4 < closed["yes"] / sum(closed.values()) < 0.6
    open_ = Counter(i["answer"] for i in items if i["answer_type"] == "OPEN")
    assert open_.most_common(1)[0][1] / sum(open_.values()) < 0.3


def test_labels_cover_exactly_the_answer(demo):
    tok = load_tokenizer(demo / "tokenizer")
    samples = read_dataset("vqa_rad", demo, "train")
    ds = VLMDataset(samples, tok, image_size=32, n_image_tokens=4, max_length=96)
    item = ds[0]
    labelled = item["labels"][item["labels"] != -100].tolist()
    assert tok.decode(labelled[:-1]) == samples[0].answer.lower()
    assert labelled[-1] == tok.eos_token_id
    assert int(item["image_token_mask"].sum()) == 4
    assert item["input_ids"].tolist().count(tok.bos_token_id) == 1 and item["input_ids"][0] == tok.bos_token_id
    # the image span sits between "<img>" and "</img>"
    first = int(item["image_token_mask"].nonzero()[0])
    assert tok.decode(item["input_ids"][first - 1 : first].tolist()).strip() == ">"


def test_collate_pads_and_counts_bad_samples(demo, tmp_path):
    tok = load_tokenizer(demo / "tokenizer")
    samples = read_dataset("vqa_rad", demo, "train")[:3]
    samples[1].image_path = str(tmp_path / "missing.png")
    ds = VLMDataset(samples, tok, image_size=32, n_image_tokens=4, max_length=96)
    items = [ds[i] for i in range(3)]
    assert "missing.png" in items[1]["bad"]
    batch = collate(items, tok.pad_token_id)
    assert batch["n_bad"] == 1 and batch["input_ids"].shape[0] == 2
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    gen = generation_batch([VLMDataset(samples, tok, image_size=32, n_image_tokens=4, train=False)[0]], tok.pad_token_id)
    assert gen["image_token_mask"].sum() == 4


def test_unreadable_image_error_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(bad, 16)


def test_prompt_too_long_is_a_bad_sample(demo):
    tok = load_tokenizer(demo / "tokenizer")
    samples = read_dataset("vqa_rad", demo, "train")[:1]
    item = VLMDataset(samples, tok, image_size=32, n_image_tokens=64, max_length=40)[0]
    assert "max_length" in item["bad"]


def test_short_prompt_draw_is_seeded():
    import random

    a = [build_prompt("vqa", "q?", rng=random.Random(5), short_prompt_prob=0.5) for _ in range(1)]
    b = [build_prompt("vqa", "q?", rng=random.Random(5), short_prompt_prob=0.5) for _ in range(1)]
    assert a == b
    assert build_prompt("vqa", "is it?") == (
        "<s>[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: is it? [/INST]"
    )


def test_readers_and_their_errors(tmp_path):
    (tmp_path / "images").mkdir()
    vqa = [{"qid": 1, "image_name": "a.jpg", "image_organ": "HEAD", "answer": "yes", "answer_type": "CLOSED",
            "question_type": "PRES", "question": "q?", "phrase_type": "test_freeform"},
           {"qid": 2, "image_name": "b.jpg", "image_organ": "CHEST", "answer": "no", "answer_type": "CLOSED",
            "question_type": "PRES", "question": "q?", "phrase_type": "freeform"}]
    (tmp_path / "vqa_rad.json").write_text(json.dumps(vqa))
    assert [s.meta["qid"] for s in read_dataset("vqa_rad", tmp_path / "vqa_rad.json", "test")] == [1]
    assert [s.meta["qid"] for s in read_dataset("vqa_rad", tmp_path / "vqa_rad.json", "train")] == [2]
    slake = [{"img_name": "x/source.jpg", "question": "q", "answer": "a", "q_lang": "en", "answer_type": "OPEN"},
             {"img_name": "x/source.jpg", "question": "问", "answer": "答", "q_lang": "zh", "answer_type": "OPEN"}]
    (tmp_path / "train.json").write_text(json.dumps(slake))
    assert len(read_dataset("slake", tmp_path, "train")) == 1
    (tmp_path / "caps.json").write_text(json.dumps([{"image": "r.jpg", "caption": "a chest"}]))
    assert read_dataset("caption", tmp_path / "caps.json")[0].task == "caption"
    (tmp_path / "captions.txt").write_text("ROCO_00002\tA CT scan.\n")
    assert read_dataset("roco", tmp_path)[0].image_path.endswith("ROCO_00002.jpg")
    (tmp_path / "annotation.json").write_text(json.dumps({"train": [{"id": "x", "report": "normal.", "image_path": ["1.png", "2.png"]}]}))
    assert read_dataset("iu_xray", tmp_path, "train")[0].image_path.endswith("1.png")

    (tmp_path / "broken.json").write_text('[{"image": "a.jpg",\n "caption": }]')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2"):
        read_dataset("caption", tmp_path / "broken.json")
    (tmp_path / "nofield.json").write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(DataError, match="nofield.json: item 0 has no field 'caption'"):
        read_dataset("caption", tmp_path / "nofield.json")
    with pytest.raises(DataError, match="file not found"):
        read_dataset("vqa_rad", tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset kind"):
        read_dataset("mimic", tmp_path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_window_from_header(name):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file(name)
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if "WindowCenter" in ds:
        c = float(ds.WindowCenter[0]) if ds["WindowCenter"].VM > 1 else float(ds.WindowCenter)
        w = float(ds.WindowWidth[0]) if ds["WindowWidth"].VM > 1 else float(ds.WindowWidth)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = raw.min(), raw.max()
    expected = np.round((np.clip(raw, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    assert np.array_equal(dicom_to_uint8(path), expected)
    x = load_image(path, 24)
    assert x.shape == (3, 24, 24)
    lowest = (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert float(x.min()) >= lowest - 1e-5
