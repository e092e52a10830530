"""PeFoMed's VQA accuracy: both texts normalized as its `MedVQAEval` does, then strict equality.

An item is correct when the normalized prediction equals a normalized reference (an item may carry
several acceptable references; PeFoMed's data has one each). Reported: CLOSED, OPEN and overall
accuracy, and the same broken down by question_type, organ and modality when the items carry them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pefomed.evaluate.metrics.normalize import normalize_pefomed

BREAKDOWNS = ("question_type", "organ", "modality")


def references_of(item: dict) -> list[str]:
    answer = item["answer"]
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def is_correct(prediction: str, references: Iterable[str]) -> bool:
    pred = normalize_pefomed(prediction)
    return any(pred == normalize_pefomed(ref) for ref in references)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def answer_type_of(item: dict) -> str:
    return str(item.get("answer_type") or "").upper()


def group_accuracy(items: Sequence[dict], hits: Sequence[float], field: str) -> dict[str, dict]:
    """{value: {"n", "accuracy"}} over the items that carry `field`; empty when none does."""
    groups: dict[str, list[float]] = {}
    for item, hit in zip(items, hits):
        value = item.get(field)
        if value not in (None, ""):
            groups.setdefault(str(value), []).append(hit)
    return {k: {"n": len(v), "accuracy": _mean(v)} for k, v in sorted(groups.items())}


def vqa_accuracy(items: Sequence[dict], breakdowns: Sequence[str] = BREAKDOWNS) -> dict:
    """Accuracy over `{prediction, answer, answer_type, ...}` items; per-item results in "correct"."""
    hits = [float(is_correct(it["prediction"], references_of(it))) for it in items]
    closed = [h for it, h in zip(items, hits) if answer_type_of(it) == "CLOSED"]
    open_ = [h for it, h in zip(items, hits) if answer_type_of(it) == "OPEN"]
    result = {"n": len(hits), "n_closed": len(closed), "n_open": len(open_),
              "closed": _mean(closed), "open": _mean(open_), "overall": _mean(hits),
              "correct": [bool(h) for h in hits]}
    for field in breakdowns:
        groups = group_accuracy(items, hits, field)
        if groups:
            result[f"by_{field}"] = groups
    return result
