"""Dataset readers: VQA-RAD, SLAKE, PathVQA (converted json), caption lists, ROCO, IU-Xray/MIMIC.

Each reader returns a list of `Sample`s. Files and fields are checked here, and a `DataError`
names the file, the item index and the field. Images are not opened here: that happens per
sample in the dataset (`engine.data.collate.VLMDataset`), where a missing or unreadable image
becomes a counted bad sample instead of stopping a run over one file.

Formats, as the public code of the recipes reads them:
- VQA-RAD: `trainset.json` / `testset.json` (or one combined file, whose test split is the
  items whose phrase_type contains "test"): `[{qid, image_name, image_organ, answer,
  answer_type, question_type, question, phrase_type}]`, images in `images/`.
- SLAKE: `{split}.json` items `{img_name: "xmlab1/source.jpg", question, answer, q_lang,
  answer_type, content_type, location, modality, qid}`; only q_lang "en" is kept; images in
  `imgs/`.
- PathVQA, converted json: `{split}.json` items `{qid, image_name, answer, answer_type,
  question, question_type}`, images in `images/{split}/` (`.jpg` added to bare ids).
- Caption lists (PeFoMed's ROCO, CLEF2022, MEDICAT): `[{"image", "caption"}]`.
- ROCO release: `{split}/radiology/captions.txt` lines `ROCO_00002<TAB>caption`, images in
  `{split}/radiology/images/ROCO_00002.jpg`.
- IU-Xray / MIMIC-CXR (R2Gen `annotation.json`): `{"train": [{id, report, image_path: [...],
  split}], "val": [...], "test": [...]}`; the first image of each study is used. MIMIC-CXR may
  also come as `{jpg_path: [reports]}` (all in one split), read by `read_mimic`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pefomed.errors import UserError

PROMPT_KINDS = ("vqa", "caption", "report")


class DataError(UserError, ValueError):
    """A dataset file that cannot be used as it is; the message names the file and the fix."""


@dataclass
class Sample:
    """One training or evaluation example. The image is opened later, by the dataset."""

    image_path: str
    prompt_kind: str  # "vqa" | "caption" | "report": which prompt template wraps it
    question: str | None
    answer: str  # the target: a short answer, a caption or a report
    meta: dict = field(default_factory=dict)  # qid, answer_type, question_type, organ, modality

    def __post_init__(self) -> None:
        if self.prompt_kind not in PROMPT_KINDS:
            raise ValueError(f"Sample.prompt_kind {self.prompt_kind!r}: expected one of {', '.join(PROMPT_KINDS)}")

    @property
    def task(self) -> str:
        return self.prompt_kind


def load_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def require(item, name: str, path: Path, index: int) -> str:
    """The field as a string; a missing, null or empty field is an error naming item and field."""
    if not isinstance(item, dict):
        raise DataError(f"{path}: item {index} is a {type(item).__name__}, expected an object with field {name!r}")
    if name not in item:
        raise DataError(f"{path}: item {index} has no field {name!r}")
    value = item[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}: item {index} has an empty field {name!r}")
    return str(value).strip()


def _as_list(data, path: Path, what: str = "the file") -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected {what} to be a JSON list of items, found {type(data).__name__}")
    return data


def _split_name(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r}: expected train, val or test")
    return split


def _images(image_root: str | Path | None, default: Path) -> Path:
    return Path(image_root) if image_root else default


def _vqa_rad_item(item: dict, path: Path, i: int, images: Path) -> Sample:
    return Sample(
        image_path=str(images / require(item, "image_name", path, i)),
        prompt_kind="vqa",
        question=require(item, "question", path, i),
        answer=require(item, "answer", path, i),
        meta={
            "qid": item.get("qid", i),
            "answer_type": require(item, "answer_type", path, i).upper(),
            "question_type": str(item.get("question_type", "")),
            "organ": str(item.get("image_organ", "")),
            "modality": str(item.get("modality", "")),
        },
    )


def read_vqa_rad(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """`root/trainset.json` or `root/testset.json`, or one combined file split by phrase_type."""
    root, split = Path(root), _split_name(split)
    if root.suffix == ".json":
        path, combined, images = root, True, _images(image_root, root.parent / "images")
    else:
        path = root / f"{split}set.json"
        combined, images = False, _images(image_root, root / "images")
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if combined and ("test" in str(require(item, "phrase_type", path, i))) != (split == "test"):
            continue
        samples.append(_vqa_rad_item(item, path, i, images))
    return samples


def read_slake(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """SLAKE `{split}.json`, English questions only."""
    root = Path(root)
    path = root if root.suffix == ".json" else root / f"{_split_name(split)}.json"
    images = _images(image_root, path.parent / "imgs")
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if isinstance(item, dict) and item.get("q_lang", "en") != "en":
            continue
        samples.append(Sample(
            image_path=str(images / require(item, "img_name", path, i)),
            prompt_kind="vqa",
            question=require(item, "question", path, i),
            answer=require(item, "answer", path, i),
            meta={"qid": item.get("qid", i), "answer_type": str(item.get("answer_type", "")).upper(),
                  "question_type": str(item.get("content_type", "")), "organ": str(item.get("location", "")),
                  "modality": str(item.get("modality", ""))},
        ))
    return samples


def read_pathvqa(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """PathVQA converted json; answer_type, when absent, is CLOSED for yes/no answers."""
    root = Path(root)
    path = root if root.suffix == ".json" else root / f"{_split_name(split)}.json"
    images = _images(image_root, path.parent / "images" / split)
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        answer = require(item, "answer", path, i)
        answer_type = str(item.get("answer_type") or ("CLOSED" if answer.lower() in ("yes", "no") else "OPEN")).upper()
        name = require(item, "image_name", path, i)
        samples.append(Sample(
            image_path=str(images / (name if Path(name).suffix else name + ".jpg")),
            prompt_kind="vqa",
            question=require(item, "question", path, i),
            answer=answer,
            meta={"qid": item.get("qid", i), "answer_type": answer_type,
                  "question_type": str(item.get("question_type", "")), "organ": "", "modality": "pathology"},
        ))
    return samples


def read_captions(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """A caption list `[{"image", "caption"}]`; a folder means its `captions_{split}.json`."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / f"captions_{_split_name(split)}.json"
    images = _images(image_root, path.parent / "images")
    return [
        Sample(image_path=str(images / require(item, "image", path, i)), prompt_kind="caption", question=None,
               answer=require(item, "caption", path, i), meta={"qid": i})
        for i, item in enumerate(_as_list(load_json(path), path))
    ]


def read_roco(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """ROCO's `captions.txt` (`ROCO_00002<TAB>caption` per line) with `images/ROCO_00002.jpg`."""
    root = Path(root)
    if root.name == "captions.txt":
        folder = root.parent
    elif (root / split / "radiology").is_dir():
        folder = root / split / "radiology"
    else:
        folder = root
    path = folder / "captions.txt"
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected ROCO's {split}/radiology/captions.txt)")
    images = _images(image_root, folder / "images")
    samples = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, text = line.partition("\t")
        if not sep:
            raise DataError(f"{path}: line {line_no} has no TAB between the image id and the caption")
        if not name.strip() or not text.strip():
            raise DataError(f"{path}: line {line_no} has an empty image id or caption")
        name = name.strip()
        samples.append(Sample(image_path=str(images / (name if Path(name).suffix else name + ".jpg")),
                              prompt_kind="caption", question=None, answer=text.strip(), meta={"qid": name}))
    return samples


def _first_image(item: dict, path: Path, index: int) -> str:
    if not isinstance(item, dict) or "image_path" not in item:
        raise DataError(f"{path}: item {index} has no field 'image_path'")
    paths = item["image_path"]
    first = paths[0] if isinstance(paths, list) and paths else paths
    if not isinstance(first, str) or not first.strip():
        raise DataError(f"{path}: item {index} has an empty field 'image_path'")
    return first


def read_iu_xray(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """R2Gen `annotation.json` (IU-Xray and MIMIC-CXR): the first image of each study."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "annotation.json"
    data = load_json(path)
    if not isinstance(data, dict) or split not in data:
        found = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: no {split!r} list (expected keys train/val/test, found {found})")
    images = _images(image_root, path.parent / "images")
    samples = []
    for i, item in enumerate(_as_list(data[split], path, f"{split!r}")):
        samples.append(Sample(image_path=str(images / _first_image(item, path, i)), prompt_kind="report",
                              question=None, answer=require(item, "report", path, i),
                              meta={"qid": item.get("id", i)}))
    return samples


def read_mimic(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """MIMIC-CXR as R2Gen's annotation.json, or as `{jpg_path: [reports]}` (one split, first report)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "annotation.json"
    data = load_json(path)
    if isinstance(data, dict) and any(k in data for k in ("train", "val", "test")):
        return read_iu_xray(path, split, image_root)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (R2Gen splits or {{jpg_path: [reports]}}), found {type(data).__name__}")
    images = _images(image_root, path.parent)
    samples = []
    for i, (jpg, reports) in enumerate(data.items()):
        report = reports[0] if isinstance(reports, list) and reports else reports
        if not isinstance(report, str) or not report.strip():
            raise DataError(f"{path}: entry {i} ({jpg!r}) has no report")
        samples.append(Sample(image_path=str(images / jpg), prompt_kind="report", question=None,
                              answer=report.strip(), meta={"qid": jpg}))
    return samples


READERS = {
    "vqa_rad": read_vqa_rad,
    "synthetic": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "caption": read_captions,
    "roco": read_roco,
    "iu_xray": read_iu_xray,
    "mimic": read_mimic,
}


def read_dataset(kind: str, path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """Read `path` with the reader named `kind` (a key of READERS)."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}: expected one of {', '.join(sorted(READERS))}")
    return READERS[kind](path, split=split, image_root=image_root)
