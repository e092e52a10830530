"""A second synthetic family, made differently from the radiology one: coloured shapes.

The radiology family (`engine.data.synthetic`) draws grey-scale anatomy at fixed places with 0-3
identical lesions on one side. This one draws 1-3 flat-coloured objects (circle, square or
triangle; red, green, blue or yellow, every colour at most once per image) on a noisy grey
background whose brightness varies, each object in its own quadrant of the image, jittered
inside it, with its own size. Nothing sits at a fixed place, colour carries information (the
three channels differ), and the questions ask about identity, colour, position and number.

Questions (VQA-RAD fields; question_type PRES, COUNT, COLOR, SHAPE, POS):
- closed, each "yes" half of the time: "is there a red object?", "is there a triangle?",
  "is there an object in the top left?", "are there more than two objects?";
- open: "how many objects are there?" (1-3), "what colour is the square?" (asked only of a
  shape that occurs once), "what shape is the blue object?", "where is the green object?"
  (top left, top right, bottom left, bottom right).

Every open answer is spread evenly over its choices (1/3 or 1/4 each), so the wording alone
answers no question above chance. Each image gets `SLOTS_PER_IMAGE` questions of distinct types.
The same arguments give byte-identical files, and `describe` gives each image's caption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SLOTS_PER_IMAGE = 3
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.86, 0.14, 0.12), "green": (0.12, 0.68, 0.20), "blue": (0.16, 0.30, 0.92),
           "yellow": (0.92, 0.84, 0.10)}
# Quadrants in raster order; a place is named as a person looking at the image names it.
PLACES = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# Sizes as fractions of the image side. At 64 px an object is 15-20 px across (2-2.5 patches of
# 8 px), so its outline spans several patches and never leaves its 32 px quadrant.
RADIUS = (0.12, 0.155)
JITTER = 0.06
NOISE_STD = 0.04


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    place: int  # index into PLACES
    radius: float  # fraction of the image side
    cy: float  # centre, fractions of the side
    cx: float


@dataclass(frozen=True)
class Scene:
    background: float
    things: tuple[Thing, ...]

    @property
    def count(self) -> int:
        return len(self.things)

    def by_colour(self, colour: str) -> Thing | None:
        return next((t for t in self.things if t.colour == colour), None)

    def with_shape(self, shape: str) -> list[Thing]:
        return [t for t in self.things if t.shape == shape]


def sample_scene(rng: np.random.Generator) -> Scene:
    """1-3 objects (uniform), in distinct quadrants, of distinct colours; shapes uniform, may repeat."""
    count = int(rng.integers(1, 4))
    places = rng.permutation(len(PLACES))[:count]
    colours = rng.permutation(len(COLOURS))[:count]
    names = tuple(COLOURS)
    things = []
    for place, colour in zip(places, colours):
        row, col = divmod(int(place), 2)
        things.append(Thing(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=names[int(colour)],
            place=int(place),
            radius=float(rng.uniform(*RADIUS)),
            cy=0.25 + 0.5 * row + float(rng.uniform(-JITTER, JITTER)),
            cx=0.25 + 0.5 * col + float(rng.uniform(-JITTER, JITTER)),
        ))
    return Scene(background=float(rng.uniform(0.3, 0.6)), things=tuple(sorted(things, key=lambda t: t.place)))


def shape_mask(size: int, thing: Thing) -> np.ndarray:
    """Boolean mask of one object (pixel centres, fractions of the side)."""
    y, x = ((axis + 0.5) / size for axis in np.ogrid[:size, :size])
    dy, dx, r = y - thing.cy, x - thing.cx, thing.radius
    if thing.shape == "circle":
        return dy**2 + dx**2 <= r**2
    if thing.shape == "square":  # the same area as the circle: side r * sqrt(pi)
        half = 0.5 * r * np.sqrt(np.pi)
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # An upright equilateral-ish triangle: apex at the top, base at the bottom.
    top, bottom = -r, 0.8 * r
    width = (dy - top) / (bottom - top) * 1.1 * r
    return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= width)


def draw(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [size, size, 3] RGB image of the scene."""
    img = np.full((size, size, 3), scene.background, dtype=np.float64)
    for thing in scene.things:
        shade = float(rng.uniform(0.9, 1.05))
        img[shape_mask(size, thing)] = np.clip(np.array(COLOURS[thing.colour]) * shade, 0.0, 1.0)
    img += rng.normal(0.0, NOISE_STD, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _yes_no(rng: np.random.Generator, present: list[str], absent: list[str]) -> tuple[str, str] | None:
    """A value that the image has half of the time, and the answer to "is there ...?"; None when
    the image has every value or none (then the question could only be answered one way)."""
    if not present or not absent:
        return None
    if rng.random() < 0.5:
        return present[int(rng.integers(len(present)))], "yes"
    return absent[int(rng.integers(len(absent)))], "no"


def closed_questions(s: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    colours = [t.colour for t in s.things]
    shapes = sorted({t.shape for t in s.things}, key=SHAPES.index)
    taken = [PLACES[t.place] for t in s.things]
    asked = {
        "COLOR": (_yes_no(rng, colours, [c for c in COLOURS if c not in colours]), "is there a {} object?"),
        "SHAPE": (_yes_no(rng, shapes, [x for x in SHAPES if x not in shapes]), "is there a {}?"),
        "POS": (_yes_no(rng, taken, [p for p in PLACES if p not in taken]), "is there an object in the {}?"),
    }
    questions = [(text.format(pick[0]), pick[1], "CLOSED", kind) for kind, (pick, text) in asked.items() if pick]
    # "more than k": k=1 or 2 with equal chance makes "yes" half of the time over counts 1-3.
    k = 1 if rng.random() < 0.5 else 2
    questions.append((f"are there more than {COUNT_WORDS[k]} objects?", "yes" if s.count > k else "no", "CLOSED",
                      "COUNT"))
    return questions


def open_questions(s: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    thing = s.things[int(rng.integers(s.count))]
    questions = [
        ("how many objects are there?", str(s.count), "OPEN", "COUNT"),
        (f"what shape is the {thing.colour} object?", thing.shape, "OPEN", "SHAPE"),
        (f"where is the {thing.colour} object?", PLACES[thing.place], "OPEN", "POS"),
    ]
    unique = [t for t in s.things if len(s.with_shape(t.shape)) == 1]
    if unique:
        one = unique[int(rng.integers(len(unique)))]
        questions.append((f"what colour is the {one.shape}?", one.colour, "OPEN", "COLOR"))
    return questions


def choose_questions(s: Scene, rng: np.random.Generator) -> list[tuple[str, str, str, str]]:
    """`SLOTS_PER_IMAGE` distinct questions drawn from the image's closed and open ones (every
    (answer_type, question_type) pair occurs at most once per image)."""
    pool = closed_questions(s, rng) + open_questions(s, rng)
    return [pool[int(j)] for j in rng.permutation(len(pool))[:SLOTS_PER_IMAGE]]


def describe(s: Scene) -> str:
    parts = [f"a {t.colour} {t.shape} in the {PLACES[t.place]}" for t in s.things]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "object" if s.count == 1 else "objects"
    return f"{COUNT_WORDS[s.count].capitalize()} {noun}: {listed}."


def generate_split(split: str, n_questions: int, size: int, seed: int,
                   save: Callable[[str, np.ndarray], None]) -> tuple[list[dict], list[dict]]:
    """The split's VQA-RAD items and captions; `save(name, uint8 array)` writes each image."""
    rng = np.random.default_rng([seed, 2 if split == "train" else 3])  # streams apart from radiology's
    items: list[dict] = []
    captions: list[dict] = []
    while len(items) < n_questions:
        scene = sample_scene(rng)
        name = f"shapes_{split}_{len(captions):05d}.png"
        save(name, draw(scene, size, rng))
        captions.append({"image": name, "caption": describe(scene)})
        for question, answer, answer_type, question_type in choose_questions(scene, rng)[: n_questions - len(items)]:
            items.append({
                "qid": len(items),
                "image_name": name,
                "image_organ": "SHAPES",
                "answer": answer,
                "answer_type": answer_type,
                "question_type": question_type,
                "question": question,
                "phrase_type": "test_freeform" if split == "test" else "freeform",
                "modality": "DRAWING",
            })
    return items, captions
