"""The predictions file: one JSON object per line, as `evaluate.run` writes it and `evaluate.score` reads it.

Fields of an item:
- `prediction` (str, required): the model's answer or report, already cut out of the reply;
- `answer` (str, or a non-empty list of acceptable str; required unless `--references` supplies
  it): the reference answer(s) or report(s);
- `qid` (or `id`): needed to join a references file;
- `question` (str): the question (a report item may leave it out);
- `task`: "vqa" (default) or "report";
- `answer_type`: "CLOSED" or "OPEN" (any case; stored upper-case), for VQA items;
- metadata, any of `question_type`, `organ`, `modality`, and whatever else the writer adds
  (`reply`, `image`, `error`, ...), which is kept as it is.

A references file (`--references refs.json`) is either a JSON list of objects with `qid` (or `id`)
and `answer` plus any metadata, or a JSON object mapping qid to an answer, a list of answers, or
such an object. Its fields fill the ones a prediction lacks; a prediction's own fields win.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from pefomed.errors import UserError

TASKS = ("vqa", "report")
ANSWER_TYPES = ("CLOSED", "OPEN")
METADATA = ("answer_type", "question_type", "organ", "modality")


class PredictionsError(UserError, ValueError):
    """A predictions or references file that cannot be scored; the message names file, line and field."""


def item_id(item: dict) -> str | None:
    value = item.get("qid", item.get("id"))
    return None if value is None else str(value)


def validate_item(item: object, where: str) -> dict:
    """A checked, normalized copy of one item; `where` ("preds.jsonl: line 3") prefixes errors."""
    if not isinstance(item, dict):
        raise PredictionsError(f"{where}: an item is a JSON object, got {type(item).__name__}")
    out = dict(item)
    if not isinstance(out.get("prediction"), str):
        raise PredictionsError(f"{where}: field 'prediction' must be a string (the model's answer), "
                               f"got {out.get('prediction')!r}")
    answer = out.get("answer")
    if answer is None:
        raise PredictionsError(f"{where}: no field 'answer'; add the reference answer, or pass --references with "
                               "answers keyed by qid")
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, (str, int, float)) for a in answer):
            raise PredictionsError(f"{where}: field 'answer' as a list must hold one or more strings")
        out["answer"] = [str(a) for a in answer]
    elif isinstance(answer, (str, int, float)):
        out["answer"] = str(answer)
    else:
        raise PredictionsError(f"{where}: field 'answer' must be a string or a list of strings")
    task = out.get("task") or "vqa"
    if task not in TASKS:
        raise PredictionsError(f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {task!r}")
    out["task"] = task
    answer_type = out.get("answer_type")
    if answer_type not in (None, ""):
        answer_type = str(answer_type).upper()
        if answer_type not in ANSWER_TYPES:
            raise PredictionsError(f"{where}: field 'answer_type' must be CLOSED or OPEN, got {out['answer_type']!r}")
        out["answer_type"] = answer_type
    return out


def _reference_entry(value: object, where: str) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, int, float, list)):
        return {"answer": value}
    raise PredictionsError(f"{where}: a reference is an answer, a list of answers or an object with 'answer'")


def read_references(path: str | Path) -> dict[str, dict]:
    """qid -> reference fields, from either layout described in the module docstring."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: references file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PredictionsError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if isinstance(data, dict):
        return {str(k): _reference_entry(v, f"{path}: qid {k}") for k, v in data.items()}
    if isinstance(data, list):
        refs = {}
        for n, entry in enumerate(data):
            if not isinstance(entry, dict) or item_id(entry) is None:
                raise PredictionsError(f"{path}: entry {n} needs a 'qid' (or 'id') to be joined with the predictions")
            refs[item_id(entry)] = entry
        return refs
    raise PredictionsError(f"{path}: expected a JSON list of objects or an object keyed by qid")


def join_references(items: Iterable[dict], references: dict[str, dict], source: str) -> list[dict]:
    joined = []
    for n, item in enumerate(items, start=1):
        qid = item_id(item)
        ref = references.get(qid) if qid is not None else None
        if ref is None:
            if "answer" not in item:
                raise PredictionsError(f"{source}: item {n} (qid {qid}) has no 'answer' and no entry in the "
                                       "references file")
            joined.append(item)
            continue
        joined.append({**{k: v for k, v in ref.items() if k not in ("qid", "id")}, **item})
    return joined


def parse_lines(lines: Iterable[str], source: str) -> tuple[list[object], list[int]]:
    """The JSON objects of the non-blank lines, and their line numbers."""
    items, numbers = [], []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{source}: line {line_no} is not valid JSON ({e.msg})") from e
        numbers.append(line_no)
    return items, numbers


def read_predictions(path: str | Path, references: str | Path | None = None) -> list[dict]:
    """Checked items from a predictions .jsonl, with a references file's fields joined in."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: predictions file not found")
    raw, line_numbers = parse_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
    if not raw:
        raise PredictionsError(f"{path}: no items to score")
    for item, line_no in zip(raw, line_numbers):
        if not isinstance(item, dict):
            raise PredictionsError(f"{path}: line {line_no}: an item is a JSON object, got {type(item).__name__}")
    if references is not None:
        raw = join_references(raw, read_references(references), str(path))
    return [validate_item(item, f"{path}: line {n}") for item, n in zip(raw, line_numbers)]


def validate_items(items: Sequence[object], source: str = "predictions") -> list[dict]:
    """`validate_item` over in-memory items (as `evaluate.run` passes them), numbered from 1."""
    if not items:
        raise PredictionsError(f"{source}: no items to score")
    return [validate_item(item, f"{source}: item {n}") for n, item in enumerate(items, start=1)]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a temporary file of this writer's own beside `path`, then rename it
    over `path`: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the output private
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_predictions(path: str | Path, items: Iterable[dict]) -> Path:
    """Write items as .jsonl (UTF-8, one object per line), atomically."""
    return write_text_atomic(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
