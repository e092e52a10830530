"""The synthetic dataset: byte-identical per seed, balanced answers, images that show the answers."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pefomed.engine.data import synthetic

VQA_RAD_FIELDS = {"qid", "image_name", "image_organ", "answer", "answer_type", "question_type", "question", "phrase_type"}


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    synthetic.generate(root, n_train=2000, n_test=300, image_size=64, seed=0)
    return root


def test_same_seed_in_a_fresh_process_gives_byte_identical_files(tmp_path):
    args = ["--n-train", "25", "--n-test", "7", "--image-size", "32", "--seed", "7"]
    synthetic.main(["--out", str(tmp_path / "here"), *args])
    env = {**os.environ, "PYTHONHASHSEED": "4242"}  # nothing may depend on str hashing or process state
    done = subprocess.run([sys.executable, "-m", "pefomed.engine.data.synthetic", "--out", str(tmp_path / "there"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr.startswith(f"wrote {tmp_path / 'there'}: trainset.json (25)")  # logged
    assert digest(tmp_path / "here") == digest(tmp_path / "there")
    assert len(list((tmp_path / "here" / "images").iterdir())) >= 32 / 3  # at most 3 questions per image
    synthetic.generate(tmp_path / "other", n_train=25, n_test=7, image_size=32, seed=8)
    ours = json.loads((tmp_path / "here" / "trainset.json").read_text())
    theirs = json.loads((tmp_path / "other" / "trainset.json").read_text())
    # another seed gives other findings and questions, not a relabelled copy
    assert [(q["question"], q["answer"]) for q in ours] != [(q["question"], q["answer"]) for q in theirs]


def within(count: int, n: int, p: float) -> bool:
    """`count` successes of `n` agree with probability `p` to 4.5 standard deviations."""
    sd = (n * p * (1 - p)) ** 0.5
    return abs(count - n * p) <= 4.5 * sd


def test_findings_follow_the_stated_distribution(big):
    """sample_finding's docstring: body 50/50, lesion count uniform over 0-3, side and size uniform;
    three slots per image, each the image group or the lesion group with equal chance, lesion slots
    of a lesion-free image dropped: 3 * (1/2 + 1/2 * 3/4) = 2.625 questions per image."""
    captions = json.loads((big / "captions_train.json").read_text())
    findings = [(c["caption"].startswith("Chest"), *read_caption(c["caption"])) for c in captions]
    n = len(findings)
    assert within(sum(chest for chest, *_ in findings), n, 0.5)
    for count in range(4):
        assert within(sum(c == count for _, c, _, _ in findings), n, 0.25), count
    with_lesion = [f for f in findings if f[1] > 0]
    assert within(sum(side == "left" for _, _, side, _ in with_lesion), len(with_lesion), 0.5)
    assert within(sum(size == "large" for *_, size in with_lesion), len(with_lesion), 0.5)
    # questions per image: mean 2.625, variance 0.609 (3 w.p. 3/4, else Binomial(3, 1/2))
    per_image = Counter(i["image_name"] for i in json.loads((big / "trainset.json").read_text()))
    mean = 2000 / n
    assert abs(mean - 2.625) <= 4.5 * (0.609 / n) ** 0.5, mean
    lesion_free = {c["image"] for c, f in zip(captions, findings) if f[1] == 0}
    assert max(per_image[name] for name in lesion_free) <= 3 and all(per_image[c["image"]] == 3 for c, f in
                                                                      zip(captions[:-1], findings) if f[1] > 0)


def test_files_follow_the_vqa_rad_and_caption_formats(big):
    train = json.loads((big / "trainset.json").read_text())
    test = json.loads((big / "testset.json").read_text())
    assert len(train) == 2000 and len(test) == 300
    for item in train + test:
        assert VQA_RAD_FIELDS <= set(item)
        assert item["answer_type"] in ("CLOSED", "OPEN") and item["image_organ"] in ("CHEST", "HEAD")
        assert len(item["answer"].split()) == 1
        assert (big / "images" / item["image_name"]).is_file()
    assert all("test" in i["phrase_type"] for i in test) and not any("test" in i["phrase_type"] for i in train)
    assert {i["image_name"] for i in train}.isdisjoint(i["image_name"] for i in test)
    captions = json.loads((big / "captions_train.json").read_text())
    assert {"image", "caption"} == set(captions[0])
    # every image has a caption; a lesion-free image whose slots all asked about a lesion has no question
    assert {i["image_name"] for i in train} <= {c["image"] for c in captions}


def test_answers_are_balanced_per_question_type(big):
    items = json.loads((big / "trainset.json").read_text())
    per_type = defaultdict(Counter)
    for item in items:
        per_type[(item["answer_type"], item["question_type"])][item["answer"]] += 1
    for (answer_type, question_type), answers in per_type.items():
        if answer_type == "CLOSED":
            assert set(answers) == {"yes", "no"}
            assert 0.4 < answers["yes"] / sum(answers.values()) < 0.6, (question_type, answers)
    # the wording alone does not give the answer away, for the most common question either
    general = Counter(i["answer"] for i in items if i["question"] == "is there a lesion in this image?")
    assert 0.35 < general["yes"] / sum(general.values()) < 0.65
    closed = Counter(i["answer"] for i in items if i["answer_type"] == "CLOSED")
    assert 0.45 < closed["yes"] / sum(closed.values()) < 0.55
    open_ = Counter(i["answer"] for i in items if i["answer_type"] == "OPEN")
    assert open_.most_common(1)[0][1] / sum(open_.values()) < 0.15
    counts = per_type[("OPEN", "COUNT")]
    assert set(counts) == {"0", "1", "2", "3"} and min(counts.values()) / sum(counts.values()) > 0.15
    assert {t for _, t in per_type} == {"PRES", "POS", "SIZE", "COUNT", "ORGAN", "MODALITY"}


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixels."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(pixels))
    return found


def read_caption(text: str) -> tuple[int, str | None, str | None]:
    words = text.lower().rstrip(".").split()
    if "no" in words:
        return 0, None, None
    count = 1 if words[words.index("with") + 1] == "a" else {"two": 2, "three": 3}[words[words.index("with") + 1]]
    size = "large" if "large" in words else "small"
    return count, words[words.index("the") + 1], size


def test_images_show_what_the_captions_say(big):
    """Lesions found by thresholding and connected components match count, side and size."""
    captions = json.loads((big / "captions_train.json").read_text())[:80]
    areas = defaultdict(list)
    for item in captions:
        img = np.asarray(Image.open(big / "images" / item["image"]), dtype=np.float64) / 255
        chest = item["caption"].startswith("Chest")
        mask = img > 0.85 if chest else img < 0.2
        lesions = [b for b in blobs(mask) if len(b) >= 12]
        if not chest:
            # The ventricles and the air around the head are dark too, but centred.
            lesions = [b for b in lesions if abs(b[:, 1].mean() / 64 - 0.5) > 0.1]
        count, side, size = read_caption(item["caption"])
        assert len(lesions) == count, item
        for blob in lesions:
            image_right = blob[:, 1].mean() > 32
            assert side == ("left" if image_right else "right"), item  # the patient's left is the image's right
            areas[size].append(len(blob))
    assert max(areas["small"]) < 0.6 * min(areas["large"])
    assert min(areas["small"]) >= 20  # a small lesion still fills about a third of an 8x8 patch


def test_question_answers_agree_with_captions(big):
    captions = {c["image"]: read_caption(c["caption"]) for c in json.loads((big / "captions_train.json").read_text())}
    for item in json.loads((big / "trainset.json").read_text())[:300]:
        count, side, size = captions[item["image_name"]]
        q, a = item["question"], item["answer"]
        if q == "how many lesions are there?":
            assert a == str(count)
        elif q == "which side is the lesion on?":
            assert a == side
        elif q == "is there a lesion in this image?":
            assert a == ("yes" if count else "no")
        elif q.startswith("is there a lesion in the "):
            assert a == ("yes" if count and q.split()[6] == side else "no")
        elif q.startswith("is the lesion ") and q.split()[3].rstrip("?") in ("small", "large"):
            assert a == ("yes" if q.split()[3].rstrip("?") == size else "no")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_train=0"):
        synthetic.generate(tmp_path, n_train=0, n_test=3)
    with pytest.raises(ValueError, match="image_size=8"):
        synthetic.generate(tmp_path, n_train=3, n_test=3, image_size=8)
