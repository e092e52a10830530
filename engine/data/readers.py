"""Dataset readers: VQA-RAD, SLAKE, PathVQA (converted json), caption json, ROCO, IU-Xray.

Each returns a list of `Sample`s. Images are not opened here (that happens per sample in the
dataset, where an unreadable file is skipped and counted); files and fields are checked here,
with errors that name the file, the item and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A dataset file that cannot be used as it is."""


@dataclass
class Sample:
    image_path: str
    task: str  # "vqa" | "caption" | "report"
    answer: str
    question: str | None = None
    meta: dict = field(default_factory=dict)


def load_json(path: Path):
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def require(item: dict, name: str, path: Path, index: int):
    if not isinstance(item, dict) or name not in item:
        raise DataError(f"{path}: item {index} has no field {name!r}")
    return item[name]


def _as_list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, found {type(data).__name__}")
    return data


def read_vqa_rad(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """`trainset.json` / `testset.json` in `root`, or one combined file split by phrase_type."""
    root = Path(root)
    if root.is_file():
        path, combined = root, True
        images = Path(image_root) if image_root else root.parent / "images"
    else:
        path = root / ("testset.json" if split == "test" else "trainset.json")
        combined = False
        images = Path(image_root) if image_root else root / "images"
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if combined:
            is_test = "test" in str(item.get("phrase_type", ""))
            if is_test != (split == "test"):
                continue
        meta = {
            "qid": item.get("qid", i),
            "answer_type": str(require(item, "answer_type", path, i)).upper(),
            "question_type": item.get("question_type", ""),
            "organ": item.get("image_organ", ""),
            "modality": item.get("modality", ""),
        }
        samples.append(Sample(
            image_path=str(images / require(item, "image_name", path, i)),
            task="vqa",
            question=str(require(item, "question", path, i)),
            answer=str(require(item, "answer", path, i)),
            meta=meta,
        ))
    return samples


def read_slake(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    root = Path(root)
    path = root / f"{split}.json"
    images = Path(image_root) if image_root else root / "imgs"
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if item.get("q_lang", "en") != "en":
            continue
        samples.append(Sample(
            image_path=str(images / require(item, "img_name", path, i)),
            task="vqa",
            question=str(require(item, "question", path, i)),
            answer=str(require(item, "answer", path, i)),
            meta={"qid": item.get("qid", i), "answer_type": str(item.get("answer_type", "")).upper(),
                  "question_type": item.get("content_type", ""), "organ": item.get("location", ""),
                  "modality": item.get("modality", "")},
        ))
    return samples


def read_pathvqa(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """The converted json (`{qid, image_name, answer, answer_type, question, question_type}`)."""
    root = Path(root)
    path = root / f"{split}.json" if root.is_dir() else root
    images = Path(image_root) if image_root else (root if root.is_dir() else root.parent) / "images" / split
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        answer_type = str(item.get("answer_type", "")).upper()
        answer = str(require(item, "answer", path, i))
        if not answer_type:
            answer_type = "CLOSED" if answer.lower() in ("yes", "no") else "OPEN"
        name = str(require(item, "image_name", path, i))
        samples.append(Sample(
            image_path=str(images / (name if Path(name).suffix else name + ".jpg")),
            task="vqa",
            question=str(require(item, "question", path, i)),
            answer=answer,
            meta={"qid": item.get("qid", i), "answer_type": answer_type,
                  "question_type": item.get("question_type", ""), "organ": "", "modality": "pathology"},
        ))
    return samples


def read_captions(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """PeFoMed's caption lists: `[{"image": ..., "caption": ...}]` (ROCO, CLEF2022, MEDICAT)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"captions_{split}.json"
    images = Path(image_root) if image_root else path.parent / "images"
    return [
        Sample(image_path=str(images / require(item, "image", path, i)), task="caption",
               answer=str(require(item, "caption", path, i)), meta={"qid": i})
        for i, item in enumerate(_as_list(load_json(path), path))
    ]


def read_roco(root: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """ROCO: `data/{split}/radiology/captions.txt` lines `ROCO_00002<TAB>caption`, images in `images/`."""
    folder = Path(root) / split / "radiology" if (Path(root) / split).exists() else Path(root)
    path = folder / "captions.txt"
    if not path.exists():
        raise DataError(f"{path}: file not found")
    images = Path(image_root) if image_root else folder / "images"
    samples = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, caption = line.partition("\t")
        if not sep:
            raise DataError(f"{path}: line {line_no} has no TAB between the image id and the caption")
        samples.append(Sample(image_path=str(images / f"{name.strip()}.jpg"), task="caption",
                              answer=caption.strip(), meta={"qid": name.strip()}))
    return samples


def read_iu_xray(path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    """R2Gen `annotation.json`: `{"train": [{"id", "report", "image_path": [...], "split"}], ...}`."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotation.json"
    data = load_json(path)
    if not isinstance(data, dict) or split not in data:
        raise DataError(f"{path}: no {split!r} list (expected keys train/val/test)")
    images = Path(image_root) if image_root else path.parent / "images"
    samples = []
    for i, item in enumerate(_as_list(data[split], path)):
        paths = require(item, "image_path", path, i)
        first = paths[0] if isinstance(paths, list) else paths
        samples.append(Sample(image_path=str(images / first), task="report",
                              answer=str(require(item, "report", path, i)), meta={"qid": item.get("id", i)}))
    return samples


READERS = {
    "vqa_rad": read_vqa_rad,
    "synthetic": read_vqa_rad,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "caption": read_captions,
    "roco": read_roco,
    "iu_xray": read_iu_xray,
}


def read_dataset(kind: str, path: str | Path, split: str = "train", image_root: str | Path | None = None) -> list[Sample]:
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}: expected one of {sorted(READERS)}")
    return READERS[kind](path, split=split, image_root=image_root)
