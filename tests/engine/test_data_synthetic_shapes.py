"""The second synthetic family (coloured shapes): deterministic, balanced, and every answer can be
read back from the pixels by a reader that shares no code with the generator."""

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pefomed.engine.data import synthetic
from pefomed.engine.data.readers import DataError, read_dataset

PALETTE = {"red": (220, 36, 31), "green": (31, 173, 51), "blue": (41, 77, 235), "yellow": (235, 214, 26)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = {"one": 1, "two": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthetic.generate(root, n_train=3000, n_test=600, image_size=64, seed=0, family="shapes")
    return root


def read_image(path: Path) -> dict[str, tuple[str, str]]:
    """quadrant -> (colour, shape) of the object in it, read from the pixels alone.

    Objects are saturated and the background is grey, so the object is where the channels
    differ; its colour is the nearest palette entry to its mean; its shape is how much of its
    bounding box it fills (circle pi/4, square 1, upright triangle 1/2).
    """
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    saturated = rgb.max(axis=2) - rgb.min(axis=2) > 0.3 * 255
    half = rgb.shape[0] // 2
    found = {}
    for index, name in enumerate(QUADRANTS):
        row, col = divmod(index, 2)
        window = (slice(row * half, (row + 1) * half), slice(col * half, (col + 1) * half))
        mask = saturated[window]
        if mask.sum() < 40:
            continue
        ys, xs = np.nonzero(mask)
        mean = rgb[window][mask].mean(axis=0)
        colour = min(PALETTE, key=lambda c: float(((mean - PALETTE[c]) ** 2).sum()))
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        found[name] = (colour, "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square")
    return found


def expected_answer(question: str, seen: dict[str, tuple[str, str]]) -> str:
    colours = {c: place for place, (c, _) in seen.items()}
    shapes = [s for _, s in seen.values()]
    if question == "how many objects are there?":
        return str(len(seen))
    if m := re.fullmatch(r"are there more than (one|two) objects\?", question):
        return "yes" if len(seen) > NUMBERS[m[1]] else "no"
    if m := re.fullmatch(r"is there an? (\w+) object\?", question):
        return "yes" if m[1] in colours else "no"
    if m := re.fullmatch(r"is there an object in the (.+)\?", question):
        return "yes" if m[1] in seen else "no"
    if m := re.fullmatch(r"is there an? (\w+)\?", question):
        return "yes" if m[1] in shapes else "no"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return seen[colours[m[1]]][1]
    if m := re.fullmatch(r"where is the (\w+) object\?", question):
        return colours[m[1]]
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (colour,) = [c for c, s in seen.values() if s == m[1]]  # asked only of a shape that occurs once
        return colour
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_is_what_the_pixels_show(shapes):
    items = json.loads((shapes / "testset.json").read_text())
    assert len(items) == 600
    seen = {}
    for item in items:
        if item["image_name"] not in seen:
            seen[item["image_name"]] = read_image(shapes / "images" / item["image_name"])
        assert item["answer"] == expected_answer(item["question"], seen[item["image_name"]]), item
    # and the reader saw every kind of object
    found = Counter(x for scene in seen.values() for x in scene.values())
    assert {s for _, s in found} == {"circle", "square", "triangle"} and {c for c, _ in found} == set(PALETTE)


def within(count: int, n: int, p: float) -> bool:
    """`count` successes of `n` agree with probability `p` to 4.5 standard deviations."""
    return abs(count - n * p) <= 4.5 * (n * p * (1 - p)) ** 0.5


def test_answers_are_balanced_per_question_type(shapes):
    items = json.loads((shapes / "trainset.json").read_text())
    per_type = defaultdict(Counter)
    for item in items:
        per_type[(item["answer_type"], item["question_type"])][item["answer"]] += 1
    assert set(per_type) == {(a, q) for a in ("CLOSED", "OPEN") for q in ("COLOR", "SHAPE", "POS", "COUNT")}
    choices = {"COUNT": {"1", "2", "3"}, "SHAPE": {"circle", "square", "triangle"}, "POS": set(QUADRANTS),
               "COLOR": set(PALETTE)}
    for (answer_type, question_type), answers in per_type.items():
        n = sum(answers.values())
        wanted = {"yes", "no"} if answer_type == "CLOSED" else choices[question_type]
        assert set(answers) == wanted, (answer_type, question_type, answers)
        for answer in wanted:
            assert within(answers[answer], n, 1 / len(wanted)), (answer_type, question_type, answers)
    assert within(sum(i["answer_type"] == "CLOSED" for i in items), len(items), 0.5)


def test_the_wording_alone_does_not_give_the_answer(shapes):
    """Answering each test question with its wording's most common training answer does no
    better than chance (closed 1/2; open 1/3 or 1/4 per question type)."""
    train = json.loads((shapes / "trainset.json").read_text())
    by_question = defaultdict(Counter)
    for item in train:
        by_question[item["question"]][item["answer"]] += 1
    hits = Counter()
    test = json.loads((shapes / "testset.json").read_text())
    for item in test:
        guess = by_question[item["question"]].most_common(1)[0][0] if item["question"] in by_question else ""
        hits[item["answer_type"]] += guess == item["answer"]
    n = Counter(i["answer_type"] for i in test)
    assert hits["CLOSED"] / n["CLOSED"] < 0.5 + 4.5 * (0.25 / n["CLOSED"]) ** 0.5
    assert hits["OPEN"] / n["OPEN"] < 1 / 3 + 4.5 * (2 / 9 / n["OPEN"]) ** 0.5


def test_files_follow_the_vqa_rad_format_and_the_reader_reads_them(shapes):
    for split, n in (("train", 3000), ("test", 600)):
        samples = read_dataset("synthetic", str(shapes), split=split)
        assert len(samples) == n and all(Path(s.image_path).is_file() for s in samples)
        assert {s.meta["answer_type"] for s in samples} == {"CLOSED", "OPEN"}
    train = json.loads((shapes / "trainset.json").read_text())
    test = json.loads((shapes / "testset.json").read_text())
    assert {i["image_name"] for i in train}.isdisjoint(i["image_name"] for i in test)
    assert all("test" in i["phrase_type"] for i in test) and not any("test" in i["phrase_type"] for i in train)
    assert Counter(i["image_name"] for i in train).most_common(1)[0][1] == 3
    image = Image.open(shapes / "images" / train[0]["image_name"])
    assert image.mode == "RGB" and image.size == (64, 64)
    assert json.loads((shapes / "dataset.json").read_text()) == {
        "family": "shapes", "n_train": 3000, "n_test": 600, "image_size": 64, "seed": 0}


def test_same_seed_in_a_fresh_process_gives_byte_identical_files(tmp_path):
    args = ["--family", "shapes", "--n-train", "30", "--n-test", "9", "--image-size", "48", "--seed", "3"]
    synthetic.main(["--out", str(tmp_path / "here"), *args])
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    done = subprocess.run([sys.executable, "-m", "pefomed.engine.data.synthetic", "--out", str(tmp_path / "there"),
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*") if p.is_file())
    assert len(files) > 10
    for name in files:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name
    other = synthetic.generate(tmp_path / "other", n_train=30, n_test=9, image_size=48, seed=4, family="shapes")
    ours = json.loads((tmp_path / "here" / "trainset.json").read_text())
    assert [(q["question"], q["answer"]) for q in ours] != [
        (q["question"], q["answer"]) for q in json.loads((other / "trainset.json").read_text())]


def test_a_folder_keeps_its_family(tmp_path):
    synthetic.ensure_family(tmp_path / "a", "shapes", n_train=6, n_test=3, image_size=32)
    assert synthetic.generated_family(tmp_path / "a") == "shapes"
    before = (tmp_path / "a" / "trainset.json").read_bytes()
    synthetic.ensure_family(tmp_path / "a", "shapes", n_train=6, n_test=3, image_size=32)  # there: kept
    assert (tmp_path / "a" / "trainset.json").read_bytes() == before
    with pytest.raises(DataError, match=r"holds the synthetic shapes family, not radiology .*dataset\.json"):
        synthetic.ensure_family(tmp_path / "a", "radiology")
    assert synthetic.generated_family(tmp_path / "empty") is None
    with pytest.raises(ValueError, match="synthetic family 'dots'"):
        synthetic.generate(tmp_path / "b", n_train=3, n_test=3, family="dots")
