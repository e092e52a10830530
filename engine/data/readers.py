"""Dataset readers: VQA-RAD, SLAKE, PathVQA (converted json), caption lists, ROCO, IU-Xray/MIMIC.

Each reader returns a list of `Sample`s. Files and fields are checked here, and a `DataError`
names the file, the item index and the field. Images are not opened here: that happens per
sample in the dataset (`engine.data.collate.VLMDataset`), where a missing or unreadable image
becomes a counted bad sample instead of stopping a run over one file.

Formats, as the public code of the recipes reads them:
- VQA-RAD: `trainset.json` / `testset.json` (or one combined file, whose test split is the
  items whose phrase_type contains "test"): `[{qid, image_name, image_organ, answer,
  answer_type, question_type, question, phrase_type}]`, images in `images/`. No validation split.
- SLAKE (Slake1.0): `train.json`, `validate.json`, `test.json`, items `{img_name:
  "xmlab1/source.jpg", question, answer, q_lang, answer_type, content_type, location, modality,
  qid}`; only q_lang "en" is kept; images in `imgs/`.
- PathVQA, converted json: `{split}.json` (train, val, test) items `{qid, image_name, answer,
  answer_type, question, question_type}`, images in `images/{split}/` (`.jpg` added to bare ids).
- Caption lists (PeFoMed's ROCO, CLEF2022, MEDICAT): `[{"image", "caption"}]`; a folder holds
  `captions_{split}.json` (as the synthetic generator writes them).
- ROCO release: `{train,validation,test}/radiology/captions.txt`, lines `ROCO_00002<TAB>caption`,
  images in `{split}/radiology/images/ROCO_00002.jpg`.
- IU-Xray / MIMIC-CXR (R2Gen `annotation.json`): `{"train": [{id, report, image_path: [...],
  split}], "val": [...], "test": [...]}`; the first image of each study is used. MIMIC-CXR may
  also come as `{jpg_path: [reports]}` (one split), read by `read_mimic`.

Splits. A dataset folder is read at the split named: `train`, `test`, and `val` (alias
`validation`) where the dataset has one, from the file its release uses for it (`SPLIT_FILES`).
A split the dataset lacks, or whose file is not there, is a `DataError` naming the split and the
splits whose files are there. A path to a single file holds one split; when its name says which
(`test.json`, `roco_train.json`, `validate.json`), that must be the split asked for.

Image paths. An image name in a dataset file is relative to the dataset's image folder (or to
`image_root`). A name that leads outside that folder once symbolic links are resolved
(`../../etc/passwd`, an absolute path, a link to elsewhere) is a `DataError` unless
`allow_outside_root` is true (`data.allow_outside_root` in the run config).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from pefomed.errors import UserError

PROMPT_KINDS = ("vqa", "caption", "report")

# Split names a reader accepts, and the split each one means.
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}

DATASET_NAMES = {
    "vqa_rad": "VQA-RAD",
    "synthetic": "the synthetic dataset (VQA-RAD format)",
    "slake": "SLAKE",
    "pathvqa": "PathVQA (converted json)",
    "caption": "a caption list",
    "roco": "ROCO",
    "iu_xray": "IU-Xray (R2Gen annotation.json)",
    "mimic": "MIMIC-CXR",
}

# Where each dataset keeps a split, relative to its folder, under the names its release uses;
# for R2Gen's annotation.json, the key of the split's list.
SPLIT_FILES: dict[str, dict[str, str]] = {
    "vqa_rad": {"train": "trainset.json", "test": "testset.json"},
    "synthetic": {"train": "trainset.json", "test": "testset.json"},
    "slake": {"train": "train.json", "val": "validate.json", "test": "test.json"},
    "pathvqa": {"train": "train.json", "val": "val.json", "test": "test.json"},
    "caption": {"train": "captions_train.json", "val": "captions_val.json", "test": "captions_test.json"},
    "roco": {
        "train": "train/radiology/captions.txt",
        "val": "validation/radiology/captions.txt",
        "test": "test/radiology/captions.txt",
    },
    "iu_xray": {"train": "train", "val": "val", "test": "test"},
    "mimic": {"train": "train", "val": "val", "test": "test"},
}

# Words in a file or folder name that say which split it holds.
_SPLIT_WORDS = {"train": "train", "trainset": "train", "val": "val", "valset": "val", "validation": "val",
                "validate": "val", "test": "test", "testset": "test"}
_LISTED = 12  # entries of a folder named in an error


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


# ---------------------------------------------------------------- splits


def split_names(kind: str) -> tuple[str, ...]:
    """The split names dataset `kind` accepts, aliases included, e.g. ('train', 'test')."""
    have = SPLIT_FILES[kind]
    return tuple(name for name, key in SPLIT_ALIASES.items() if key in have)


def _listing(folder: Path) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not entries:
        return f"{folder} is empty"
    more = f", ... ({len(entries) - _LISTED} more)" if len(entries) > _LISTED else ""
    return f"{folder} holds: {', '.join(entries[:_LISTED])}{more}"


def _found_splits(kind: str, folder: Path) -> str:
    """What a dataset folder offers: the splits whose files are there, or what the folder holds."""
    found = [f"{key} ({rel})" for key, rel in SPLIT_FILES[kind].items() if (folder / rel).is_file()]
    if found:
        return f"splits found in {folder}: {', '.join(found)}"
    expected = ", ".join(SPLIT_FILES[kind].values())
    return f"no split file of {DATASET_NAMES[kind]} ({expected}) is there; {_listing(folder)}"


def _split_key(kind: str, split: str, where: Path, found: str = "") -> str:
    """The split `split` means for `kind` ('validation' -> 'val'), or a DataError saying what exists."""
    key = SPLIT_ALIASES.get(split)
    if key not in SPLIT_FILES[kind]:
        raise DataError(f"{where}: {DATASET_NAMES[kind]} has no split {split!r}; its splits are "
                        f"{', '.join(split_names(kind))}" + (f"; {found}" if found else ""))
    return key


def declared_split(name: str) -> str | None:
    """The split a file or folder name says it holds ('roco_train.json' -> 'train'), if exactly one."""
    words = {_SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", PurePath(name).stem.lower()) if w in _SPLIT_WORDS}
    return words.pop() if len(words) == 1 else None


def _check_declared(path: Path, name: str, key: str, split: str) -> str | None:
    declared = declared_split(name)
    if declared is not None and declared != key:
        raise DataError(
            f"{path}: its name says it holds the {declared!r} split, but split {split!r} was asked for; point the "
            f"dataset path at the dataset's folder to read a split by name, or at the {split} file itself"
        )
    return declared


def _split_file(kind: str, root: Path, split: str) -> tuple[Path, str, str | None]:
    """(file to read, split key, the split the file's own name declares) for a folder or a file path."""
    if root.suffix == ".json":
        key = _split_key(kind, split, root)
        return root, key, _check_declared(root, root.name, key, split)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found (for split {split!r}; {DATASET_NAMES[kind]} keeps its "
                        f"splits in such a folder as {', '.join(SPLIT_FILES[kind].values())})")
    key = _split_key(kind, split, root, _found_splits(kind, root))
    path = root / SPLIT_FILES[kind][key]
    if not path.is_file():
        raise DataError(f"{root}: no {split!r} split of {DATASET_NAMES[kind]}: {SPLIT_FILES[kind][key]} is not there; "
                        f"{_found_splits(kind, root)}")
    return path, key, key


# ---------------------------------------------------------------- image paths


class _ImageFolder:
    """Joins the image names of a dataset file to its image folder, refusing names that lead out."""

    def __init__(self, image_root: str | Path | None, default: Path, allow_outside_root: bool) -> None:
        self.folder = Path(image_root) if image_root else default
        self.allow_outside_root = allow_outside_root
        self.real = self.folder.resolve()

    def join(self, name: str, source: Path, where: str, field_name: str) -> str:
        path = self.folder / name
        if not self.allow_outside_root:
            real = path.resolve()  # symbolic links resolved: a link out of the folder is outside
            if not real.is_relative_to(self.real):
                if PurePath(name).is_absolute():
                    why = "an absolute path"
                elif ".." in PurePath(name).parts:
                    why = "'..' climbs out of it"
                else:
                    why = "a symbolic link leads out of it"
                raise DataError(
                    f"{source}: {where} field {field_name!r} is {name!r}, which leads outside the image folder "
                    f"{self.folder} ({why}, to {real}); make it a path inside {self.folder} (or set the dataset's "
                    "image_root to the folder that holds the images), or set data.allow_outside_root: true if the "
                    "dataset points outside its folder on purpose"
                )
        return str(path)


# ---------------------------------------------------------------- readers


def _vqa_rad_item(item: dict, path: Path, i: int, images: _ImageFolder) -> Sample:
    return Sample(
        image_path=images.join(require(item, "image_name", path, i), path, f"item {i}", "image_name"),
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


def read_vqa_rad(root: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                 allow_outside_root: bool = False, kind: str = "vqa_rad") -> list[Sample]:
    """`root/trainset.json` or `root/testset.json`, or one combined file split by phrase_type."""
    path, key, declared = _split_file(kind, Path(root), split)
    # A file whose name does not say its split is the combined release: its phrase_type does.
    combined = declared is None
    images = _ImageFolder(image_root, path.parent / "images", allow_outside_root)
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if combined and ("test" in str(require(item, "phrase_type", path, i))) != (key == "test"):
            continue
        samples.append(_vqa_rad_item(item, path, i, images))
    return samples


def read_synthetic(root: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                   allow_outside_root: bool = False) -> list[Sample]:
    """The synthetic demo dataset, written in VQA-RAD's format (`engine.data.synthetic`)."""
    return read_vqa_rad(root, split, image_root, allow_outside_root=allow_outside_root, kind="synthetic")


def read_slake(root: str | Path, split: str = "train", image_root: str | Path | None = None, *,
               allow_outside_root: bool = False) -> list[Sample]:
    """SLAKE `train.json` / `validate.json` / `test.json`, English questions only."""
    path, _, _ = _split_file("slake", Path(root), split)
    images = _ImageFolder(image_root, path.parent / "imgs", allow_outside_root)
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        if isinstance(item, dict) and item.get("q_lang", "en") != "en":
            continue
        samples.append(Sample(
            image_path=images.join(require(item, "img_name", path, i), path, f"item {i}", "img_name"),
            prompt_kind="vqa",
            question=require(item, "question", path, i),
            answer=require(item, "answer", path, i),
            meta={"qid": item.get("qid", i), "answer_type": str(item.get("answer_type", "")).upper(),
                  "question_type": str(item.get("content_type", "")), "organ": str(item.get("location", "")),
                  "modality": str(item.get("modality", ""))},
        ))
    return samples


def read_pathvqa(root: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                 allow_outside_root: bool = False) -> list[Sample]:
    """PathVQA converted json; answer_type, when absent, is CLOSED for yes/no answers."""
    path, key, _ = _split_file("pathvqa", Path(root), split)
    images = _ImageFolder(image_root, path.parent / "images" / key, allow_outside_root)
    samples = []
    for i, item in enumerate(_as_list(load_json(path), path)):
        answer = require(item, "answer", path, i)
        answer_type = str(item.get("answer_type") or ("CLOSED" if answer.lower() in ("yes", "no") else "OPEN")).upper()
        name = require(item, "image_name", path, i)
        samples.append(Sample(
            image_path=images.join(name if PurePath(name).suffix else name + ".jpg", path, f"item {i}", "image_name"),
            prompt_kind="vqa",
            question=require(item, "question", path, i),
            answer=answer,
            meta={"qid": item.get("qid", i), "answer_type": answer_type,
                  "question_type": str(item.get("question_type", "")), "organ": "", "modality": "pathology"},
        ))
    return samples


def read_captions(path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                  allow_outside_root: bool = False) -> list[Sample]:
    """A caption list `[{"image", "caption"}]`; a folder means its `captions_{split}.json`."""
    path, _, _ = _split_file("caption", Path(path), split)
    images = _ImageFolder(image_root, path.parent / "images", allow_outside_root)
    return [
        Sample(image_path=images.join(require(item, "image", path, i), path, f"item {i}", "image"),
               prompt_kind="caption", question=None, answer=require(item, "caption", path, i), meta={"qid": i})
        for i, item in enumerate(_as_list(load_json(path), path))
    ]


def _roco_captions(root: Path, split: str) -> Path:
    """The captions.txt to read: `root` itself or one in `root` or `root/radiology` (one split folder:
    its name, when it says, must be the split asked for), else `root/<split>/radiology/captions.txt`."""
    candidates = [root] if root.name == "captions.txt" else [root / "captions.txt", root / "radiology" / "captions.txt"]
    for single in candidates:
        if single.is_file():
            folder = single.parent
            named = folder.parent.name if folder.name == "radiology" else folder.name
            _check_declared(single, named, _split_key("roco", split, single), split)
            return single
    path, _, _ = _split_file("roco", root, split)
    return path


def read_roco(root: str | Path, split: str = "train", image_root: str | Path | None = None, *,
              allow_outside_root: bool = False) -> list[Sample]:
    """ROCO's `captions.txt` (`ROCO_00002<TAB>caption` per line) with `images/ROCO_00002.jpg`."""
    path = _roco_captions(Path(root), split)
    images = _ImageFolder(image_root, path.parent / "images", allow_outside_root)
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
        samples.append(Sample(
            image_path=images.join(name if PurePath(name).suffix else name + ".jpg", path, f"line {line_no}", "image id"),
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


def _annotation_path(path: Path) -> Path:
    return path if path.suffix == ".json" else path / "annotation.json"


def read_iu_xray(path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                 allow_outside_root: bool = False, kind: str = "iu_xray") -> list[Sample]:
    """R2Gen `annotation.json` (IU-Xray and MIMIC-CXR): the first image of each study."""
    path = _annotation_path(Path(path))
    data = load_json(path)
    found = f"the file holds the lists: {', '.join(sorted(data))}" if isinstance(data, dict) else ""
    key = _split_key(kind, split, path, found)
    if not isinstance(data, dict) or key not in data:
        found = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: no {key!r} list for split {split!r} (expected keys train/val/test, found {found})")
    images = _ImageFolder(image_root, path.parent / "images", allow_outside_root)
    samples = []
    for i, item in enumerate(_as_list(data[key], path, f"{key!r}")):
        samples.append(Sample(image_path=images.join(_first_image(item, path, i), path, f"item {i} of {key!r}", "image_path"),
                              prompt_kind="report", question=None, answer=require(item, "report", path, i),
                              meta={"qid": item.get("id", i)}))
    return samples


def read_mimic(path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
               allow_outside_root: bool = False) -> list[Sample]:
    """MIMIC-CXR as R2Gen's annotation.json, or as `{jpg_path: [reports]}` (one split, first report)."""
    path = _annotation_path(Path(path))
    data = load_json(path)
    if isinstance(data, dict) and any(k in data for k in ("train", "val", "test")):
        return read_iu_xray(path, split, image_root, allow_outside_root=allow_outside_root, kind="mimic")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object (R2Gen splits or {{jpg_path: [reports]}}), found {type(data).__name__}")
    key = _split_key("mimic", split, path)
    _check_declared(path, path.name, key, split)
    images = _ImageFolder(image_root, path.parent, allow_outside_root)
    samples = []
    for i, (jpg, reports) in enumerate(data.items()):
        report = reports[0] if isinstance(reports, list) and reports else reports
        if not isinstance(report, str) or not report.strip():
            raise DataError(f"{path}: entry {i} ({jpg!r}) has no report")
        samples.append(Sample(image_path=images.join(jpg, path, f"entry {i}", "image path (the key)"), prompt_kind="report",
                              question=None, answer=report.strip(), meta={"qid": jpg}))
    return samples


READERS = {
    "vqa_rad": read_vqa_rad,
    "synthetic": read_synthetic,
    "slake": read_slake,
    "pathvqa": read_pathvqa,
    "caption": read_captions,
    "roco": read_roco,
    "iu_xray": read_iu_xray,
    "mimic": read_mimic,
}


def read_dataset(kind: str, path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                 allow_outside_root: bool = False) -> list[Sample]:
    """Read `path` with the reader named `kind` (a key of READERS)."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}: expected one of {', '.join(sorted(READERS))}")
    return READERS[kind](path, split=split, image_root=image_root, allow_outside_root=allow_outside_root)
