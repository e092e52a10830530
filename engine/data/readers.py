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
  also come as `{jpg_path: [reports]}` (one split), or as the PhysioNet release itself (see
  `read_mimic`): `mimic-cxr-2.0.0-split.csv.gz`, the sectioned report files
  `mimic-cxr-reports/files/pXX/pXXXXXXXX/sXXXXXXXX.txt` (findings + impression become the target)
  and the images `files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg` (MIMIC-CXR-JPG) or `.dcm`.
  MIMIC-CXR is credentialed data: its samples carry `meta["restricted"] = True`, which the GPT
  judge honours (`evaluate/judge.py`).
- OmniMedVQA: `QA_information/Open-access/<dataset>.json`, lists of `{question_id, question,
  option_A..option_D, gt_answer, modality_type, question_type, image_path: "Images/...",
  dataset}`, image paths relative to the OmniMedVQA folder. Multiple choice becomes open-ended as
  in arXiv 2504.05575: the question keeps no options and the correct option's text is the answer.
  The release has no splits; see `read_omnimedvqa` for the deterministic one used here.

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
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from pefomed.errors import UserError

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("vqa", "caption", "report")

# Split names a reader accepts, and the split each one means.
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test", "all": "all"}

DATASET_NAMES = {
    "vqa_rad": "VQA-RAD",
    "synthetic": "the synthetic dataset (VQA-RAD format)",
    "slake": "SLAKE",
    "pathvqa": "PathVQA (converted json)",
    "caption": "a caption list",
    "roco": "ROCO",
    "iu_xray": "IU-Xray (R2Gen annotation.json)",
    "mimic": "MIMIC-CXR",
    "omnimedvqa": "OmniMedVQA",
}

OMNIMEDVQA_QA_DIR = "QA_information/Open-access"

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
    # OmniMedVQA ships no splits: every split is drawn from the same files (read_omnimedvqa).
    "omnimedvqa": {"train": OMNIMEDVQA_QA_DIR, "val": OMNIMEDVQA_QA_DIR, "test": OMNIMEDVQA_QA_DIR,
                   "all": OMNIMEDVQA_QA_DIR},
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


# ---------------------------------------------------------------- MIMIC-CXR

MIMIC_SPLIT_CSV = ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv")
MIMIC_METADATA_CSV = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
# Where the sectioned reports are: MIMIC-CXR-JPG users unpack mimic-cxr-reports.zip beside the
# images; the MIMIC-CXR (DICOM) release puts the .txt files in the same files/ tree as the studies.
MIMIC_REPORT_FOLDERS = ("mimic-cxr-reports/files", "files")
MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}
# A frontal view shows what the report describes; a lateral one only when nothing else exists.
VIEW_PREFERENCE = {"PA": 0, "AP": 1}
IMAGE_SUFFIXES = (".jpg", ".dcm")

# A section header of a MIMIC-CXR report: upper case at the start of a line, then a colon
# ("FINDINGS:", "IMPRESSION:", "PA AND LATERAL VIEWS OF THE CHEST:"), as the MIMIC-CXR code's
# section parser finds them.
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]{1,60}?)[ \t]*:(?=\s|$)", re.MULTILINE)
# Header names that mean findings or impression besides the ones that contain those words.
SECTION_ALIASES = {"conclusion": "impression", "conclusions": "impression", "chest, two views": "findings"}


def report_sections(text: str) -> dict[str, str]:
    """The findings and impression of a MIMIC-CXR report, whitespace collapsed, by section name.

    A header naming both ("FINDINGS AND IMPRESSION") counts as the impression; several sections of
    one kind are joined in order.
    """
    found: dict[str, list[str]] = {}
    heads = list(_SECTION.finditer(text))
    for head, following in zip(heads, heads[1:] + [None]):
        name = head.group(1).strip().lower()
        name = SECTION_ALIASES.get(name) or ("impression" if "impression" in name else
                                             "findings" if "finding" in name else name)
        body = " ".join(text[head.end():following.start() if following else len(text)].split())
        if name in ("findings", "impression") and body:
            found.setdefault(name, []).append(body)
    return {name: " ".join(parts) for name, parts in found.items()}


def mimic_report_target(text: str) -> str | None:
    """Findings then impression, one space apart; None when the report has neither."""
    sections = report_sections(text)
    target = " ".join(sections[name] for name in ("findings", "impression") if name in sections)
    return target or None


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    import csv
    import gzip

    try:
        with (gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz"
              else path.open(encoding="utf-8", newline="")) as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV file ({e})") from e


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _mimic_folder(root: Path) -> Path | None:
    """The folder of a PhysioNet MIMIC-CXR(-JPG) release (the one holding the split CSV), if `root` is one."""
    return root if root.is_dir() and _first_file(root, MIMIC_SPLIT_CSV) is not None else None


def _study_folder(subject_id: str, study_id: str) -> PurePath:
    """`p10/p10000032/s50414267`: where both PhysioNet releases keep a study, under their `files/`."""
    subject = f"p{subject_id}"
    return PurePath(subject[:3], subject, f"s{study_id}")


def read_mimic_release(root: Path, split: str, image_root: str | Path | None = None, *,
                       allow_outside_root: bool = False) -> list[Sample]:
    """One sample per study of the PhysioNet release in `root`, at the split its split CSV assigns.

    The image is the study's first frontal view (PA, then AP, from the metadata CSV when it is
    there), else its first image, as `<dicom_id>.jpg` (MIMIC-CXR-JPG) or `.dcm` (MIMIC-CXR),
    under `image_root` (default: `root`). The target is the report's findings and impression. A
    study without a report file, or whose report has neither section, is left out and counted in
    a warning, as R2Gen's preprocessing leaves them out.
    """
    split_csv = _first_file(root, MIMIC_SPLIT_CSV)
    key = _split_key("mimic", split, root)
    rows = _read_csv_rows(split_csv)
    missing = [c for c in ("dicom_id", "study_id", "subject_id", "split") if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{split_csv}: no column(s) {missing}; expected dicom_id, study_id, subject_id, split")
    metadata_csv = _first_file(root, MIMIC_METADATA_CSV)
    views = ({r["dicom_id"]: r.get("ViewPosition", "") for r in _read_csv_rows(metadata_csv)}
             if metadata_csv is not None else {})
    studies: dict[tuple[str, str], list[str]] = {}
    for line, row in enumerate(rows, start=2):
        if row["split"] not in MIMIC_SPLITS:
            raise DataError(f"{split_csv}: line {line} has split {row['split']!r}; expected one of "
                            f"{', '.join(MIMIC_SPLITS)}")
        if MIMIC_SPLITS[row["split"]] == key:
            studies.setdefault((row["subject_id"], row["study_id"]), []).append(row["dicom_id"])
    images = _ImageFolder(image_root, root, allow_outside_root)
    report_roots = [root / folder for folder in MIMIC_REPORT_FOLDERS]
    samples: list[Sample] = []
    no_report: list[Path] = []
    no_sections: list[Path] = []
    for (subject_id, study_id), dicom_ids in studies.items():
        study = _study_folder(subject_id, study_id)
        report = next((r / study.parent / f"{study.name}.txt" for r in report_roots
                       if (r / study.parent / f"{study.name}.txt").is_file()), None)
        if report is None:
            no_report.append(report_roots[0] / study.parent / f"{study.name}.txt")
            continue
        target = mimic_report_target(report.read_text(encoding="utf-8", errors="replace"))
        if target is None:
            no_sections.append(report)
            continue
        dicom_id = min(dicom_ids, key=lambda d: (VIEW_PREFERENCE.get(views.get(d, ""), 2), dicom_ids.index(d)))
        names = ["files" / study / f"{dicom_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        name = next((n for n in names if (images.folder / n).is_file()), names[0])
        samples.append(Sample(image_path=images.join(str(name), split_csv, f"study s{study_id}", "image path"),
                              prompt_kind="report", question=None, answer=target,
                              meta={"qid": f"s{study_id}", "restricted": True}))
    if studies and not samples:
        raise DataError(f"{root}: none of the {len(studies)} {split} studies has a report with findings or impression; "
                        f"looked for {no_report[0] if no_report else no_sections[0]} (reports are read from "
                        f"{' or '.join(str(r) for r in report_roots)}: unpack mimic-cxr-reports.zip there)")
    if no_report:
        logger.warning("%s: %d of %d %s studies have no report file (the first: %s); they are left out",
                       root, len(no_report), len(studies), split, no_report[0])
    if no_sections:
        logger.warning("%s: %d of %d %s reports have neither findings nor impression (the first: %s); they are "
                       "left out", root, len(no_sections), len(studies), split, no_sections[0])
    return samples


def read_mimic(path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
               allow_outside_root: bool = False) -> list[Sample]:
    """MIMIC-CXR in any of three layouts; every sample is marked `restricted` (credentialed data).

    - the PhysioNet release folder (`read_mimic_release`), recognised by its split CSV;
    - R2Gen's `annotation.json` (a folder holding it, or the file);
    - `{jpg_path: [reports]}` (one split, first report), images relative to the file's folder.
    """
    root = Path(path)
    if _mimic_folder(root) is not None and not (root / "annotation.json").is_file():
        return read_mimic_release(root, split, image_root, allow_outside_root=allow_outside_root)
    path = _annotation_path(root)
    data = load_json(path)
    if isinstance(data, dict) and any(k in data for k in ("train", "val", "test")):
        samples = read_iu_xray(path, split, image_root, allow_outside_root=allow_outside_root, kind="mimic")
        for sample in samples:
            sample.meta["restricted"] = True
        return samples
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
                              question=None, answer=report.strip(), meta={"qid": jpg, "restricted": True}))
    return samples


# ---------------------------------------------------------------- OmniMedVQA

OMNIMEDVQA_OPTIONS = ("option_A", "option_B", "option_C", "option_D")
# OmniMedVQA has no official split. Items are split by image (every question about one image
# lands in the same split), from a hash of its path, so the split does not depend on file order.
OMNIMEDVQA_SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}
CLOSED_ANSWERS = ("yes", "no")


def omnimedvqa_split(image_path: str) -> str:
    """The split ("train", "val" or "test") of an OmniMedVQA image: 80/10/10 by SHA-256 of its path."""
    import hashlib

    bucket = int.from_bytes(hashlib.sha256(image_path.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < OMNIMEDVQA_SPLIT_PERCENT["train"]:
        return "train"
    return "val" if bucket < OMNIMEDVQA_SPLIT_PERCENT["train"] + OMNIMEDVQA_SPLIT_PERCENT["val"] else "test"


def _omnimedvqa_files(path: Path) -> tuple[list[Path], Path]:
    """(QA files to read, the folder their image paths are relative to) for a root, QA folder or file."""
    if path.suffix == ".json":
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        files = [path]
    else:
        folder = path / OMNIMEDVQA_QA_DIR if (path / OMNIMEDVQA_QA_DIR).is_dir() else path
        if not folder.is_dir():
            raise DataError(f"{path}: OmniMedVQA folder not found (give the folder that holds {OMNIMEDVQA_QA_DIR}/ "
                            "and Images/, or one QA json file)")
        files = sorted(folder.glob("*.json"))
        if not files:
            raise DataError(f"{folder}: no OmniMedVQA QA files (*.json) there; expected the folder that holds "
                            f"{OMNIMEDVQA_QA_DIR}/; {_listing(folder)}")
    # Image paths ("Images/ACRIMA/Im001_ACRIMA.jpg") are relative to the folder above QA_information.
    qa_info = next((p for p in files[0].parents if p.name == "QA_information"), None)
    return files, (qa_info.parent if qa_info is not None else files[0].parent)


def _load_qa_items(path: Path) -> list:
    """A QA file: a JSON list, or JSON Lines (some copies of the release are dumped that way)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if text.lstrip().startswith("{"):  # a QA file is a list; an object first means one item per line
        items = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from e
        return items
    return _as_list(load_json(path), path)


def _correct_option(item: dict, answer: str) -> str | None:
    """The option whose text is `gt_answer` (compared without surrounding space and case)."""
    options = [str(item[k]).strip() for k in OMNIMEDVQA_OPTIONS if item.get(k) not in (None, "")]
    return next((o for o in options if o.casefold() == answer.casefold()), None)


def read_omnimedvqa(path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                    allow_outside_root: bool = False) -> list[Sample]:
    """OmniMedVQA's open-access QA files, multiple choice turned open-ended.

    `path`: the OmniMedVQA folder (holding `QA_information/Open-access/` and `Images/`), the
    Open-access folder, or one QA file. The question is kept without its options; the answer is
    the correct option's text (`gt_answer`); answer_type is CLOSED for yes/no answers, OPEN
    otherwise; the modality (`modality_type`, or `modality` in the few items that use that key) is
    kept for per-modality scores. Split `all` is every item; `train`, `val` and `test` take 80/10/10
    of the images by a hash of their path (`omnimedvqa_split`), every question of an image in the
    same split. Restricted-access files are not read (their images are not distributed).
    """
    key = _split_key("omnimedvqa", split, Path(path))
    files, default_images = _omnimedvqa_files(Path(path))
    images = _ImageFolder(image_root, default_images, allow_outside_root)
    samples = []
    unmatched: list[str] = []
    for file in files:
        for i, item in enumerate(_load_qa_items(file)):
            name = require(item, "image_path", file, i)
            if key != "all" and omnimedvqa_split(name) != key:
                continue
            answer = require(item, "gt_answer", file, i)
            option = _correct_option(item, answer)
            if option is None:
                unmatched.append(f"{file.name} item {i}")
            answer = option or answer
            qid = item.get("question_id", f"{file.stem}_{i}")
            samples.append(Sample(
                image_path=images.join(name, file, f"item {i}", "image_path"),
                prompt_kind="vqa",
                question=require(item, "question", file, i),
                answer=answer,
                meta={"qid": qid,
                      "answer_type": "CLOSED" if answer.lower().rstrip(".") in CLOSED_ANSWERS else "OPEN",
                      "question_type": str(item.get("question_type", "")),
                      "organ": "",
                      "modality": str(item.get("modality_type") or item.get("modality") or ""),
                      "dataset": str(item.get("dataset", file.stem))},
            ))
    if unmatched:
        logger.warning("OmniMedVQA: %d items have a gt_answer that is none of their options (the first: %s); "
                       "their gt_answer is the answer", len(unmatched), unmatched[0])
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
    "omnimedvqa": read_omnimedvqa,
}


def read_dataset(kind: str, path: str | Path, split: str = "train", image_root: str | Path | None = None, *,
                 allow_outside_root: bool = False) -> list[Sample]:
    """Read `path` with the reader named `kind` (a key of READERS)."""
    if kind not in READERS:
        raise DataError(f"unknown dataset kind {kind!r}: expected one of {', '.join(sorted(READERS))}")
    return READERS[kind](path, split=split, image_root=image_root, allow_outside_root=allow_outside_root)
