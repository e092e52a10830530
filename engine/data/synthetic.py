"""The embedded default dataset: synthetic "radiology" images with known findings.

Each image is a grey-scale chest radiograph (a body outline, two dark lungs, a heart) or a
brain MRI slice (a skull ring, two hemispheres, ventricles). Some carry 1-3 bright lesions on
one side, small or large. Everything about them is known, so the VQA-RAD-style questions
(closed yes/no and open) have exact answers. Sides follow the radiological convention: the
patient's left is on the image's right.

Written in the VQA-RAD format (`trainset.json`, `testset.json`, `images/`) and PeFoMed's
caption format (`captions_train.json`, `captions_test.json`). The generator is deterministic:
the same seed gives byte-identical files.

    python -m engine.data.synthetic --out data/demo --n-train 2000 --n-test 300 --image-size 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.prompts import CAPTION_INSTRUCTION, REPORT_INSTRUCTION, VQA_INSTRUCTIONS, WRAPPER

QUESTIONS_PER_IMAGE = 3
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


def _ellipse(h, w, cy, cx, ry, rx):
    y, x = np.ogrid[:h, :w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def draw(finding: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    s = size
    img = np.zeros((s, s), dtype=np.float64)
    if finding["organ"] == "chest":
        img[_ellipse(s, s, 0.52 * s, 0.5 * s, 0.46 * s, 0.44 * s)] = 0.45
        lungs = {"right": 0.30 * s, "left": 0.70 * s}  # patient's right lung on the image's left
        for cx in lungs.values():
            img[_ellipse(s, s, 0.47 * s, cx, 0.30 * s, 0.15 * s)] = 0.12
        img[_ellipse(s, s, 0.62 * s, 0.56 * s, 0.12 * s, 0.10 * s)] = 0.6
    else:
        img[_ellipse(s, s, 0.5 * s, 0.5 * s, 0.46 * s, 0.40 * s)] = 0.9
        img[_ellipse(s, s, 0.5 * s, 0.5 * s, 0.41 * s, 0.35 * s)] = 0.4
        lungs = {"right": 0.36 * s, "left": 0.64 * s}
        for cx in lungs.values():
            img[_ellipse(s, s, 0.5 * s, cx, 0.10 * s, 0.04 * s)] = 0.1
    if finding["count"]:
        cx0 = lungs[finding["side"]]
        radius = (0.11 if finding["size"] == "large" else 0.055) * s
        rows = np.linspace(0.30, 0.66, finding["count"] + 2)[1:-1] if finding["organ"] == "chest" else np.linspace(0.28, 0.72, finding["count"] + 2)[1:-1]
        for cy in rows:
            jitter = rng.uniform(-0.02, 0.02, size=2) * s
            img[_ellipse(s, s, cy * s + jitter[0], cx0 + jitter[1], radius, radius)] = 1.0
    img += rng.normal(0.0, 0.03, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def sample_finding(rng: np.random.Generator) -> dict:
    organ = "chest" if rng.random() < 0.5 else "brain"
    # Two images in three carry lesions: absent images only admit "no" to closed questions,
    # so this keeps closed answers near 50% yes.
    if rng.random() < 1 / 3:
        return {"organ": organ, "count": 0, "side": None, "size": None}
    return {"organ": organ, "count": int(rng.integers(1, 4)), "side": str(rng.choice(["left", "right"])),
            "size": str(rng.choice(["small", "large"]))}


def place(finding: dict) -> str:
    return f"{finding['side']} lung" if finding["organ"] == "chest" else f"{finding['side']} hemisphere"


def questions(finding: dict, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) candidates for one image."""
    present = finding["count"] > 0
    cands = [
        ("is there a lesion in this image?", "yes" if present else "no", "CLOSED", "PRES"),
        ("how many lesions are there?", str(finding["count"]), "OPEN", "COUNT"),
        ("what organ is shown in this image?", finding["organ"], "OPEN", "ORGAN"),
    ]
    if present:
        asked_side = str(rng.choice(["left", "right"]))
        asked_size = str(rng.choice(["small", "large"]))
        cands += [
            (f"is the lesion on the {asked_side} side?", "yes" if asked_side == finding["side"] else "no", "CLOSED", "POS"),
            (f"is the lesion {asked_size}?", "yes" if asked_size == finding["size"] else "no", "CLOSED", "SIZE"),
            ("which side is the lesion on?", finding["side"], "OPEN", "POS"),
            ("what is the size of the lesion?", finding["size"], "OPEN", "SIZE"),
        ]
    return cands


def caption(finding: dict) -> str:
    kind = "chest radiograph" if finding["organ"] == "chest" else "brain mri"
    if not finding["count"]:
        return f"{kind} with no lesion."
    n = finding["count"]
    noun = "lesion" if n == 1 else "lesions"
    return f"{kind} with {COUNT_WORDS[n]} {finding['size']} {noun} in the {place(finding)}."


def generate_split(out: Path, split: str, n_questions: int, size: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    items, captions = [], []
    image_dir = out / "images"
    n_images = (n_questions + QUESTIONS_PER_IMAGE - 1) // QUESTIONS_PER_IMAGE
    for i in range(n_images):
        finding = sample_finding(rng)
        name = f"synpic_{split}_{i:05d}.png"
        Image.fromarray(draw(finding, size, rng), mode="L").save(image_dir / name, optimize=False)
        captions.append({"image": name, "caption": caption(finding)})
        cands = questions(finding, rng)
        for j in rng.permutation(len(cands))[:QUESTIONS_PER_IMAGE]:
            if len(items) == n_questions:
                break
            question, answer, answer_type, question_type = cands[int(j)]
            items.append({
                "qid": len(items), "image_name": name, "image_organ": finding["organ"].upper(),
                "answer": answer, "answer_type": answer_type, "question_type": question_type,
                "question": question, "phrase_type": "test_freeform" if split == "test" else "freeform",
                "modality": "XR" if finding["organ"] == "chest" else "MRI",
            })
    return items, captions


def generate(out: str | Path, n_train: int = 2000, n_test: int = 300, image_size: int = 64, seed: int = 0) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        items, caps = generate_split(out, split, n, image_size, seed)
        (out / f"{split}set.json").write_text(json.dumps(items, indent=1))
        (out / f"captions_{split}.json").write_text(json.dumps(caps, indent=1))
    return out


def corpus(root: str | Path) -> list[str]:
    """Every text the demo tokenizer must know: prompts, questions, answers, captions."""
    root = Path(root)
    texts = [WRAPPER, CAPTION_INSTRUCTION, REPORT_INSTRUCTION, *VQA_INSTRUCTIONS.values()]
    for split in ("train", "test"):
        for item in json.loads((root / f"{split}set.json").read_text()):
            texts += [item["question"], item["answer"]]
        texts += [c["caption"] for c in json.loads((root / f"captions_{split}.json").read_text())]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic radiology VQA dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.n_train, args.n_test, args.image_size, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
