"""Training augmentation: PeFoMed's random resized crop and horizontal flip, with a flip that keeps
the text true.

PeFoMed trains with LAVIS's `blip2_image_train` transform: a random resized crop to the input size
(area scale 0.5-1, aspect ratio 3/4-4/3, bicubic), then a horizontal flip with probability 0.5.
The crop follows torchvision's `RandomResizedCrop` (ten tries at a random area and log-uniform
aspect ratio, then a centre crop of the clamped ratio).

A mirrored radiograph shows each finding on the other side of the image, and under the
radiological convention the other side of the image is the patient's other side. PeFoMed flips
blindly, so half of the "which side is the lesion on?" samples it trains on carry the wrong
answer. Here (`laterality: swap`, the default) a flipped sample's question and answer have their
sides swapped: `left` <-> `right` as whole words with their case kept (`Left-sided` ->
`Right-sided`, `leftward` -> `rightward`), the side-coded abbreviations LUL <-> RUL, LLL <-> RLL,
LUQ <-> RUQ, LLQ <-> RLQ (and the limbs LUE/RUE, LLE/RLE), and a lone capital `L` / `R` where it
can only mean a side: the whole text, in brackets ("(R)"), or before a word that takes a side
("R lung"). A sample whose text names a side in a way that cannot be swapped safely is not flipped:
a lone `L` / `R` anywhere else ("2 L of fluid"), or a term whose truth a mirror changes without a
side word to swap (dextrocardia, situs, levocardia, the right middle lobe and the lingula, which
have no counterpart, clockwise rotation). `laterality: skip` never flips a sample whose text names
a side; `blind` is PeFoMed's flip, for reproducing the published recipe.

Every draw comes from a generator seeded by (seed, epoch, index), apart from the prompt's
generator, so a sample is augmented the same way whenever that epoch is replayed (resume, workers).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass

from PIL import Image

from pefomed.engine.config import AugmentConfig
from pefomed.engine.data.readers import Sample

# Whole words whose side flips with the image: the word, and its -ward(s)/-most forms.
_SIDE_WORD = re.compile(r"\b(left|right)(?=(?:wards?|most)?\b)", re.IGNORECASE)
_SWAP_WORD = {"left": "right", "right": "left"}
# Upper-case abbreviations that carry the side in their first letter.
_SIDE_CODES = ("UL", "LL", "UQ", "LQ", "UE", "LE")
_SIDE_CODE = re.compile(r"\b([LR])(" + "|".join(_SIDE_CODES) + r")\b")
# A lone capital L or R (not part of L4, L-spine, R/O, 2L).
_LONE_LETTER = re.compile(r"(?<![\w\-/.])([LR])(?![\w\-/])")
# Words that take a side, so "R lung" or "L kidney" can only mean right lung, left kidney.
SIDED_NOUNS = (
    "lung", "lobe", "hemithorax", "chest", "side", "breast", "kidney", "ureter", "adrenal", "ovary", "testis",
    "hemisphere", "ventricle", "atrium", "hip", "knee", "shoulder", "elbow", "wrist", "ankle", "arm", "leg", "hand",
    "foot", "femur", "humerus", "clavicle", "rib", "ribs", "diaphragm", "hilum", "eye", "orbit", "ear", "sinus",
    "mainstem", "bronchus", "pleural", "effusion", "pneumothorax", "base", "apex",
)
_SIDED_LETTER = re.compile(r"^\s+(?:" + "|".join(SIDED_NOUNS) + r")\b", re.IGNORECASE)
# Terms whose truth a mirror image changes with no side word to swap, or that have no mirror
# counterpart: a sample naming one is never flipped.
_UNSAFE = re.compile(
    r"\b(dextro\w*|levo\w*|sinistr\w*|situs|mirror[- ]image|"
    r"(?:counter|anti)?-?clockwise|middle\s+lobe|lingula\w*|RML)\b",
    re.IGNORECASE,
)


def _with_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _letter_is_a_side(text: str, match: re.Match) -> bool:
    before, after = text[: match.start()], text[match.end():]
    if not before.strip() and not after.strip(" .?!"):
        return True  # the whole text ("R")
    if before.endswith(("(", "[")) and after.startswith((")", "]")):
        return True
    return bool(_SIDED_LETTER.match(after))


def names_side(text: str | None) -> bool:
    """Whether `text` says anything that a horizontal mirror changes."""
    if not text:
        return False
    return bool(_SIDE_WORD.search(text) or _SIDE_CODE.search(text) or _LONE_LETTER.search(text)
                or _UNSAFE.search(text))


def swap_sides(text: str | None) -> str | None:
    """`text` as it reads for the mirrored image, or None when it cannot be swapped safely.

    Text that names no side comes back unchanged.
    """
    if not text:
        return text
    if _UNSAFE.search(text):
        return None
    letters = list(_LONE_LETTER.finditer(text))
    if any(not _letter_is_a_side(text, m) for m in letters):
        return None
    swapped = _SIDE_WORD.sub(lambda m: _with_case(_SWAP_WORD[m.group(1).lower()], m.group(1)), text)
    swapped = _SIDE_CODE.sub(lambda m: ("R" if m.group(1) == "L" else "L") + m.group(2), swapped)
    return _LONE_LETTER.sub(lambda m: "R" if m.group(1) == "L" else "L", swapped)


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    # Ten misses (extreme ratios on a narrow image): the largest centred crop of a ratio in range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class Augment:
    """`augment(image, sample, seed=, epoch=, index=) -> (image of size x size, sample)`.

    The sample comes back with its question and answer swapped when the image was flipped under
    `laterality: swap`; it is the same object when nothing in it changed.
    """

    config: AugmentConfig
    size: int

    def __call__(self, image: Image.Image, sample: Sample, *, seed: int, epoch: int,
                 index: int) -> tuple[Image.Image, Sample]:
        cfg = self.config
        rng = random.Random(f"augment/{seed}/{epoch}/{index}")
        box = crop_box(image.width, image.height, cfg.crop_scale, cfg.crop_ratio, rng)
        flip = rng.random() < cfg.hflip
        if flip and cfg.laterality != "blind":
            texts = (sample.question, sample.answer)
            if cfg.laterality == "skip":
                flip = not any(names_side(t) for t in texts)
            else:
                question, answer = (swap_sides(t) for t in texts)
                flip = answer is not None and (question is not None or sample.question is None)
                if flip and (question, answer) != texts:
                    sample = dataclasses.replace(sample, question=question, answer=answer)
        image = image.convert("RGB").crop(box).resize((self.size, self.size), Image.BICUBIC)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image, sample


def make_augment(config: AugmentConfig | None, size: int) -> Augment | None:
    """The training augmentation of `data.augment` (None: none) for images of `size` pixels."""
    return None if config is None else Augment(config, size)
