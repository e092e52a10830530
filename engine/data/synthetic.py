"""The embedded default dataset: synthetic "radiology" images whose findings are all known.

Each image is either a chest radiograph (a body outline, two dark lungs, a heart) or a head MRI
slice (a skull ring, brain parenchyma, two ventricles). It carries 0-3 lesions, all on one side
and of one size: bright opacities in a lung, dark (hypointense) blobs in a hemisphere. Sides
follow the radiological convention: the patient's left is on the image's right.

The image is built for a tiny model with a random frozen ViT (patch 8 on 64 px): organs and
lesions are large, high-contrast and well apart. At 64 px a small lesion is 6.4 px across (half
a patch), a large one 10.2 px (more than a patch), and neighbouring lesions are 12.8 px apart,
so they never merge and the answers can be read from the patches.

Questions follow VQA-RAD: closed yes/no ones (answer_type CLOSED) and open single-word ones
(OPEN), tagged with question_type (PRES, POS, SIZE, COUNT, ORGAN, MODALITY). They are drawn so
that no question can be answered from its wording alone: every closed question type (and the
general "is there a lesion in this image?") is yes half of the time, and open answers spread
over 14 words. Each image gets three question slots; a slot
picks the "any image" group or the "about the lesion" group with equal probability, and
lesion slots of a lesion-free image are dropped, so the image-level questions see images with
and without lesions in their natural 3:1 ratio.

A second family, `shapes` (`engine.data.synthetic_shapes`), is made differently: coloured
circles, squares and triangles at random places, asked about by colour, shape, place and number.
A recipe that learns from the images must learn on both without being tuned to either.

Written in the VQA-RAD format (`trainset.json`, `testset.json`, `images/`) and PeFoMed's
caption format (`captions_train.json`, `captions_test.json`: `[{"image", "caption"}]`), with
`dataset.json` recording the family and the arguments. The generator keeps no global state: the
same arguments give byte-identical files.

    python -m pefomed.engine.data.synthetic --out data/demo --n-train 2000 --n-test 300 --image-size 64 --seed 0
    python -m pefomed.engine.data.synthetic --family shapes --out data/demo-shapes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pefomed.engine.data import synthetic_shapes
from pefomed.engine.data.prompts import (
    CAPTION_INSTRUCTIONS,
    EXPERT_PREFIX,
    REPORT_INSTRUCTIONS,
    TASKS,
    VQA_INSTRUCTIONS,
    WRAPPER,
)
from pefomed.engine.data.readers import DataError
from pefomed.errors import run_cli

logger = logging.getLogger("pefomed.engine.data.synthetic")  # also when run as __main__

FAMILIES = ("radiology", "shapes")
DATASET_FILE = "dataset.json"  # what a generated folder holds: family and arguments
SLOTS_PER_IMAGE = 3
SIDES = ("left", "right")
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

# Geometry as fractions of the image side. The patient's right is on the image's left.
LESION_RADIUS = {"small": 0.05, "large": 0.08}
BODY = {
    "chest": {"part": "lung", "organ": "CHEST", "modality": "XR", "modality_word": "xray",
              "centre_x": {"right": 0.29, "left": 0.71}, "mid_row": 0.44, "row_step": 0.20, "lesion_value": 0.95},
    "head": {"part": "hemisphere", "organ": "HEAD", "modality": "MRI", "modality_word": "mri",
             "centre_x": {"right": 0.31, "left": 0.69}, "mid_row": 0.50, "row_step": 0.20, "lesion_value": 0.0},
}
LESION_ORGAN = {"chest": "lung", "head": "brain"}
NOISE_STD = 0.03
JITTER = 0.006


@dataclass(frozen=True)
class Finding:
    body: str  # "chest" | "head"
    count: int  # 0-3 lesions
    side: str | None  # the patient's side of every lesion
    size: str | None

    @property
    def present(self) -> bool:
        return self.count > 0

    @property
    def place(self) -> str:
        return f"{self.side} {BODY[self.body]['part']}"


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Boolean mask of an ellipse given in fractions of the image side (pixel centres)."""
    y, x = ((axis + 0.5) / size for axis in np.ogrid[:size, :size])
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _draw_chest(img: np.ndarray, size: int, wobble: np.ndarray) -> None:
    img[_ellipse(size, 0.52, 0.5, 0.46 + wobble[0], 0.46 + wobble[1])] = 0.5
    for cx in BODY["chest"]["centre_x"].values():
        img[_ellipse(size, 0.44, cx, 0.28, 0.16)] = 0.1
    img[_ellipse(size, 0.68, 0.5, 0.12, 0.10)] = 0.7


def _draw_head(img: np.ndarray, size: int, wobble: np.ndarray) -> None:
    img[_ellipse(size, 0.5, 0.5, 0.46 + wobble[0], 0.40 + wobble[1])] = 0.95
    img[_ellipse(size, 0.5, 0.5, 0.41 + wobble[0], 0.35 + wobble[1])] = 0.45
    for cx in (0.46, 0.54):
        img[_ellipse(size, 0.5, cx, 0.12, 0.03)] = 0.1


def draw(finding: Finding, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [size, size] grey-scale image of the finding."""
    img = np.zeros((size, size), dtype=np.float64)
    wobble = rng.uniform(-0.015, 0.015, size=2)
    (_draw_chest if finding.body == "chest" else _draw_head)(img, size, wobble)
    if finding.present:
        body = BODY[finding.body]
        radius = LESION_RADIUS[finding.size]
        cx = body["centre_x"][finding.side]
        # A row step apart (12.8 px at 64 px) even when large (10.2 px across), so lesions never merge.
        offsets = np.arange(finding.count) - (finding.count - 1) / 2
        for cy in body["mid_row"] + body["row_step"] * offsets:
            dy, dx = rng.uniform(-JITTER, JITTER, size=2)
            img[_ellipse(size, cy + dy, cx + dx, radius, radius)] = body["lesion_value"]
    img += rng.normal(0.0, NOISE_STD, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def sample_finding(rng: np.random.Generator) -> Finding:
    """Body part 50/50, lesion count uniform over 0-3, side and size uniform."""
    body = "chest" if rng.random() < 0.5 else "head"
    count = int(rng.integers(0, 4))
    if count == 0:
        return Finding(body, 0, None, None)
    return Finding(body, count, SIDES[int(rng.integers(2))], SIZES[int(rng.integers(2))])


def _other(value: str, choices: tuple[str, str]) -> str:
    return choices[1] if value == choices[0] else choices[0]


def presence_question(f: Finding, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """"is there a lesion in this image?" or "... in the left lung?", each "yes" half of the time.

    One image in four has no lesion. Asking the general form of half the lesion-free images and
    of one image with lesions in six makes it yes half of the time; the side form then sees
    lesions in 5/6 of its images and asks about the lesion's own side 3/5 of the time.
    """
    general = rng.random() < (1 / 6 if f.present else 1 / 2)
    if general:
        return ("is there a lesion in this image?", "yes" if f.present else "no", "CLOSED", "PRES")
    if f.present:
        asked = f.side if rng.random() < 3 / 5 else _other(f.side, SIDES)
    else:
        asked = SIDES[int(rng.integers(2))]
    answer = "yes" if f.present and asked == f.side else "no"
    return (f"is there a lesion in the {asked} {BODY[f.body]['part']}?", answer, "CLOSED", "PRES")


def image_questions(f: Finding, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) that any image admits."""
    return [
        presence_question(f, rng),
        ("is there more than one lesion?", "yes" if f.count > 1 else "no", "CLOSED", "COUNT"),
        ("how many lesions are there?", str(f.count), "OPEN", "COUNT"),
        ("what imaging modality is this?", BODY[f.body]["modality_word"], "OPEN", "MODALITY"),
        ("which part of the body is shown?", f.body, "OPEN", "ORGAN"),
    ]


def lesion_questions(f: Finding, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """Questions that presuppose a lesion; empty for a lesion-free image."""
    if not f.present:
        return []
    side, size = SIDES[int(rng.integers(2))], SIZES[int(rng.integers(2))]
    return [
        (f"is the lesion on the {side} side?", "yes" if side == f.side else "no", "CLOSED", "POS"),
        (f"is the lesion {size}?", "yes" if size == f.size else "no", "CLOSED", "SIZE"),
        ("which side is the lesion on?", f.side, "OPEN", "POS"),
        ("what is the size of the lesion?", f.size, "OPEN", "SIZE"),
        ("which organ contains the lesion?", LESION_ORGAN[f.body], "OPEN", "ORGAN"),
    ]


def choose_questions(f: Finding, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    groups = [image_questions(f, rng), lesion_questions(f, rng)]
    picks = [int(g) for g in rng.integers(0, 2, size=SLOTS_PER_IMAGE)]
    chosen = []
    for g, group in enumerate(groups):
        wanted = picks.count(g)
        if group and wanted:
            chosen += [group[int(j)] for j in rng.permutation(len(group))[:wanted]]
    return chosen


def caption(f: Finding) -> str:
    kind = "Chest radiograph" if f.body == "chest" else "Brain MRI"
    if not f.present:
        return f"{kind} with no lesion."
    if f.count == 1:
        return f"{kind} with a {f.size} lesion in the {f.place}."
    return f"{kind} with {COUNT_WORDS[f.count]} {f.size} lesions in the {f.place}."


def generate_split(out: Path, split: str, n_questions: int, size: int, seed: int,
                   family: str = "radiology") -> tuple[list[dict], list[dict]]:
    """Images of one split written to `out/images`; returns (VQA-RAD items, caption items)."""
    if family == "shapes":
        def save(name: str, pixels: np.ndarray) -> None:
            Image.fromarray(pixels, mode="RGB").save(out / "images" / name)

        return synthetic_shapes.generate_split(split, n_questions, size, seed, save)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    items: list[dict] = []
    captions: list[dict] = []
    while len(items) < n_questions:
        finding = sample_finding(rng)
        name = f"synpic_{split}_{len(captions):05d}.png"
        Image.fromarray(draw(finding, size, rng), mode="L").save(out / "images" / name)
        captions.append({"image": name, "caption": caption(finding)})
        for question, answer, answer_type, question_type in choose_questions(finding, rng)[: n_questions - len(items)]:
            items.append({
                "qid": len(items),
                "image_name": name,
                "image_organ": BODY[finding.body]["organ"],
                "answer": answer,
                "answer_type": answer_type,
                "question_type": question_type,
                "question": question,
                "phrase_type": "test_freeform" if split == "test" else "freeform",
                "modality": BODY[finding.body]["modality"],
            })
    return items, captions


def generate(out: str | Path, n_train: int = 2000, n_test: int = 300, image_size: int = 64, seed: int = 0,
             family: str = "radiology") -> Path:
    """Write the dataset of `family` to `out`: n_train / n_test questions (2.6 or 3 per image)."""
    if family not in FAMILIES:
        raise ValueError(f"synthetic family {family!r}: expected one of {', '.join(FAMILIES)}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train={n_train}, n_test={n_test}: both splits need at least one question")
    if image_size < 16:
        raise ValueError(f"image_size={image_size}: lesions need at least 16 pixels to stay visible")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        items, caps = generate_split(out, split, n, image_size, seed, family)
        (out / f"{split}set.json").write_text(json.dumps(items, indent=1) + "\n")
        (out / f"captions_{split}.json").write_text(json.dumps(caps, indent=1) + "\n")
    args = {"family": family, "n_train": n_train, "n_test": n_test, "image_size": image_size, "seed": seed}
    (out / DATASET_FILE).write_text(json.dumps(args, indent=1) + "\n")
    return out


def generated_family(root: str | Path) -> str | None:
    """The family a generated folder holds (radiology for one written before families existed);
    None when nothing was generated there."""
    root = Path(root)
    if not (root / "testset.json").exists():
        return None
    marker = root / DATASET_FILE
    return json.loads(marker.read_text())["family"] if marker.exists() else "radiology"


def ensure_family(root: str | Path, family: str, **kwargs) -> Path:
    """Generate `family` into `root` unless it is there; another family there is an error."""
    found = generated_family(root)
    if found is None:
        return generate(root, family=family, **kwargs)
    if found != family:
        raise DataError(f"{root}: holds the synthetic {found} family, not {family} (see {Path(root) / DATASET_FILE}); "
                        "delete the folder or give the dataset another path")
    return Path(root)


def corpus(root: str | Path) -> list[str]:
    """Every text the demo tokenizer must know: prompts, questions, answers, captions."""
    root = Path(root)
    texts = [WRAPPER.format(task=task, instruction="") for task in TASKS]
    texts += [*CAPTION_INSTRUCTIONS, *REPORT_INSTRUCTIONS, EXPERT_PREFIX]
    texts += [template.format(q="") for template in VQA_INSTRUCTIONS.values()]
    for split in ("train", "test"):
        for item in json.loads((root / f"{split}set.json").read_text()):
            texts += [item["question"], item["answer"]]
        texts += [c["caption"] for c in json.loads((root / f"captions_{split}.json").read_text())]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic radiology VQA dataset (VQA-RAD format)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-train", type=int, default=2000, help="training questions")
    parser.add_argument("--n-test", type=int, default=300, help="test questions")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default="radiology")
    args = parser.parse_args(argv)
    generate(args.out, args.n_train, args.n_test, args.image_size, args.seed, args.family)
    logger.info("wrote %s: trainset.json (%d), testset.json (%d), captions_*.json, images/",
                args.out, args.n_train, args.n_test)


if __name__ == "__main__":
    sys.exit(run_cli(main))
