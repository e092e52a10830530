"""PeFoMed's crop and flip, with a flip that keeps the text true, measured on the synthetic set.

The synthetic images put every lesion on a known side (the patient's right on the image's left).
The pixels of an augmented image are read back (`lesion_side`: which half holds the bright chest
opacity or the dark brain blob), so the error of a blind flip is measured, not assumed: after
PeFoMed's flip every side answer names the wrong side; after ours every one names the side the
pixels show.
"""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pefomed.engine.config import AugmentConfig, load_config
from pefomed.engine.data import synthetic
from pefomed.engine.data.augment import Augment, crop_box, names_side, swap_sides
from pefomed.engine.data.collate import IGNORE_INDEX, VLMDataset
from pefomed.engine.data.images import open_image
from pefomed.engine.data.readers import read_dataset
from pefomed.engine.data.sources import build_dataset
from pefomed.engine.data.tokenizer import build_demo_tokenizer, load_tokenizer

SIZE = 64
FLIP_ONLY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0)


@pytest.mark.parametrize("text, mirrored", [
    ("which side is the lesion on?", "which side is the lesion on?"),
    ("left", "right"),
    ("Left lung mass", "Right lung mass"),
    ("LEFT PLEURAL EFFUSION", "RIGHT PLEURAL EFFUSION"),
    ("left-sided effusion with leftward shift", "right-sided effusion with rightward shift"),
    ("is the mass in the left or right lung?", "is the mass in the right or left lung?"),
    ("the rightmost rib", "the leftmost rib"),
    ("RUL and LLL opacities, RUQ pain", "LUL and RLL opacities, LUQ pain"),
    ("R", "L"),
    ("(L)", "(R)"),
    ("R lung base", "L lung base"),
    ("L4-L5 disc bulge, L-spine, R/O fracture", "L4-L5 disc bulge, L-spine, R/O fracture"),
    ("brightness of the leftover contrast", "brightness of the leftover contrast"),
    ("2 L of fluid in the left pleural space", None),  # a lone L that is a unit: not safe to swap
    ("is there dextrocardia?", None),
    ("right middle lobe collapse", None),
    ("lingular opacity on the left", None),
    ("the heart is rotated clockwise", None),
    ("levoscoliosis", None),
])
def test_swap_sides(text, mirrored):
    assert swap_sides(text) == mirrored
    assert names_side(text) == (mirrored != text)


def lesion_side(image: Image.Image, organ: str) -> str:
    """The patient's side of the lesions in an image of the synthetic set, read from its pixels."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    rows = slice(int(0.15 * SIZE), int(0.75 * SIZE))
    image_left = pixels[rows, int(0.2 * SIZE):int(0.4 * SIZE)].mean()
    image_right = pixels[rows, int(0.6 * SIZE):int(0.8 * SIZE)].mean()
    # Chest lesions are bright in a dark lung, brain lesions dark in grey matter.
    lesion_on_image_left = image_left > image_right if organ == "CHEST" else image_left < image_right
    return "right" if lesion_on_image_left else "left"  # radiological convention


@pytest.fixture(scope="module")
def side_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, n_train=400, n_test=1, image_size=SIZE, seed=0)
    samples = read_dataset("synthetic", root, "train")
    side = [s for s in samples if s.meta["question_type"] == "POS"]
    assert len(side) > 30
    return root, side


def side_truth(sample, side: str) -> str:
    """What the sample's answer should be, given the side the pixels show."""
    if sample.question == "which side is the lesion on?":
        return side
    asked = "left" if "left" in sample.question else "right"  # "is the lesion on the <side> side?"
    return "yes" if asked == side else "no"


def test_the_pixel_reader_agrees_with_every_unaugmented_answer(side_samples):
    _, side = side_samples
    for sample in side:
        image = open_image(sample.image_path)
        assert sample.answer == side_truth(sample, lesion_side(image, sample.meta["organ"])), sample


@pytest.mark.parametrize("laterality, agreement", [("swap", 1.0), ("blind", 0.0)])
def test_a_flip_keeps_side_answers_true_only_when_they_are_swapped(side_samples, laterality, agreement):
    _, side = side_samples
    augment = Augment(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, laterality=laterality),
                      SIZE)
    agree = []
    for index, sample in enumerate(side):
        image, seen = augment(open_image(sample.image_path), sample, seed=0, epoch=0, index=index)
        assert np.array_equal(np.asarray(image), np.asarray(open_image(sample.image_path))[:, ::-1])  # it flipped
        agree.append(seen.answer == side_truth(seen, lesion_side(image, seen.meta["organ"])))
    # PeFoMed's blind flip teaches the wrong side on every flipped side question; ours on none.
    assert sum(agree) / len(agree) == agreement


def test_skip_never_flips_a_sample_that_names_a_side(side_samples):
    _, side = side_samples
    augment = Augment(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0, laterality="skip"), SIZE)
    for index, sample in enumerate(side[:10]):
        image, seen = augment(open_image(sample.image_path), sample, seed=0, epoch=0, index=index)
        flipped = not np.array_equal(np.asarray(image), np.asarray(open_image(sample.image_path)))
        assert seen is sample and flipped == (not names_side(sample.question) and not names_side(sample.answer))


def test_the_dataset_trains_on_the_swapped_text(side_samples):
    root, side = side_samples
    tokenizer = load_tokenizer(build_demo_tokenizer(synthetic.corpus(root), root / "tokenizer"))
    sample = next(s for s in side if s.question == "which side is the lesion on?")
    dataset = VLMDataset([sample], tokenizer, image_size=SIZE, n_image_tokens=16, seed=0, augment=Augment(FLIP_ONLY, SIZE))
    item = dataset[0]
    target = item["labels"][item["labels"] != IGNORE_INDEX][:-1]  # the answer, without EOS
    opposite = {"left": "right", "right": "left"}[sample.answer]
    assert tokenizer.decode(target) == opposite
    # The pixels are the flipped image, normalized as evaluation normalizes.
    unflipped = VLMDataset([sample], tokenizer, image_size=SIZE, n_image_tokens=16, seed=0)[0]["pixel_values"]
    assert torch.equal(item["pixel_values"], unflipped.flip(-1))


def test_draws_are_fixed_by_seed_epoch_and_index(side_samples):
    _, side = side_samples
    augment = Augment(AugmentConfig(hflip=0.5), SIZE)
    sample, image = side[0], open_image(side[0].image_path)

    def draw(seed, epoch, index):
        out, _ = augment(image, sample, seed=seed, epoch=epoch, index=index)
        return np.asarray(out)

    assert np.array_equal(draw(1, 2, 3), draw(1, 2, 3))
    others = [draw(1, epoch, 3) for epoch in range(3, 8)] + [draw(2, 2, 3), draw(1, 2, 4)]
    assert all(not np.array_equal(draw(1, 2, 3), o) for o in others)


def test_crop_boxes_follow_random_resized_crop():
    rng = random.Random(0)
    fractions, log_ratios = [], []
    for _ in range(4000):
        left, top, right, bottom = crop_box(300, 200, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        fractions.append(w * h / (300 * 200))
        log_ratios.append(math.log(w / h))
    # Rounding to whole pixels moves the area by a few per cent at most.
    assert 0.5 * 0.97 <= min(fractions) and max(fractions) <= 1.0
    assert math.log(3 / 4) - 0.02 <= min(log_ratios) and max(log_ratios) <= math.log(4 / 3) + 0.02
    assert 0.55 < np.median(fractions) < 0.8  # mostly kept crops from the lower part: the big ones miss more
    # Ten misses (a strip far outside the ratio range): the centred crop of the nearest allowed ratio.
    assert crop_box(1000, 10, (0.9, 1.0), (1.0, 1.0), random.Random(0)) == (495, 0, 505, 10)


def test_crop_pixels_are_the_box_resized_bicubic(side_samples):
    _, side = side_samples
    sample, image = side[0], open_image(side[0].image_path)
    config = AugmentConfig(crop_scale=(0.5, 0.5), crop_ratio=(1.0, 1.0), hflip=0.0)
    out, seen = Augment(config, 48)(image, sample, seed=0, epoch=0, index=0)
    box = crop_box(SIZE, SIZE, (0.5, 0.5), (1.0, 1.0), random.Random("augment/0/0/0"))
    assert (box[2] - box[0], box[3] - box[1]) == (45, 45)  # round(sqrt(0.5) * 64)
    expected = image.convert("RGB").crop(box).resize((48, 48), Image.BICUBIC)
    assert seen is sample and np.array_equal(np.asarray(out), np.asarray(expected))


def test_config_turns_it_on_for_training_only(tmp_path):
    demo = load_config("configs/demo.yaml")
    assert demo.data.augment is None  # the demo trains without it
    for name in ("pefomed_stage1", "pefomed_stage2_vqa", "pefomed_stage2_reports"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.data.augment == AugmentConfig(crop_scale=(0.5, 1.0), hflip=0.5, laterality="swap"), name
    cfg = load_config(None, ["model.image_size=64", "data.augment={crop_scale: [0.5, 1.0], hflip: 0.5}"])
    assert build_dataset([], cfg, tokenizer=None, train=True).augment == Augment(cfg.data.augment, 64)
    assert build_dataset([], cfg, tokenizer=None, train=False).augment is None


def test_a_training_run_with_augmentation_is_reproducible(tmp_path):
    """Through the trainer: the same seed gives the same losses step for step; the augmentation changes them."""
    import json

    from pefomed.engine.session import train_from_config

    def losses(name, extra):
        cfg = load_config("configs/demo.yaml", [
            f"train.output_dir={tmp_path / name}", f"data.train=[{{kind: synthetic, path: {tmp_path / 'data'}, split: train}}]",
            f"model.tokenizer={tmp_path / 'data'}/tokenizer", "data.synthetic_train=48", "data.synthetic_test=8",
            "train.max_steps=3", "train.micro_batch_size=4", "train.progress_bar=false", "lora.dropout=0.0", *extra])
        train_from_config(cfg)
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    augment = ["data.augment={crop_scale: [0.5, 1.0], hflip: 0.5}"]
    first = losses("a", augment)
    assert losses("b", augment) == first and len(first) == 3
    plain = losses("c", [])
    assert plain[0] != first[0]  # the first batch already sees other pixels
