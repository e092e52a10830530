"""LLaVA-Med's VQA scores: token recall for open questions, yes/no accuracy for closed ones.

LLaVA-Med's published script (`llava/eval/run_eval.py`) scores a closed answer 1 when the
prediction contains "yes" or "no" *and* the reference; when it contains "yes" or "no" but not
the reference (a wrong yes/no answer) it appends nothing, so wrong answers drop out of the
denominator and closed accuracy is inflated. Our default counts them as 0;
`compat=True` reproduces the published behaviour for comparison with their tables.
Open recall follows their `calculate_f1score`: over lower-cased word counts, tp adds the
prediction's count of every word shared with the reference, fn the reference's count of every
word the prediction lacks, and recall = tp / (tp + fn).
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def open_recall(prediction: str, answer: str) -> float:
    cand, ref = Counter(_tokens(prediction)), Counter(_tokens(answer))
    if not cand or not ref:
        return 0.0
    tp = sum(count for word, count in cand.items() if word in ref)
    fn = sum(count for word, count in ref.items() if word not in cand)
    return tp / (tp + fn) if tp else 0.0


def closed_hit(prediction: str, answer: str, compat: bool = False) -> float | None:
    """1 / 0 for a closed answer; None when LLaVA-Med's script would drop the item."""
    pred, ref = prediction.lower(), answer.lower().strip()
    if "yes" in pred or "no" in pred:
        if ref in pred:
            return 1.0
        return None if compat else 0.0
    return 0.0


def llava_med_scores(items: list[dict], compat: bool = False) -> dict:
    open_items = [it for it in items if str(it.get("answer_type", "")).upper() == "OPEN"]
    closed_items = [it for it in items if str(it.get("answer_type", "")).upper() == "CLOSED"]
    recalls = [open_recall(it["prediction"], it["answer"]) for it in open_items]
    hits = [h for h in (closed_hit(it["prediction"], it["answer"], compat) for it in closed_items) if h is not None]
    return {
        "open_recall": sum(recalls) / len(recalls) if recalls else float("nan"),
        "closed_accuracy": sum(hits) / len(hits) if hits else float("nan"),
        "n_open": len(open_items),
        "n_closed_counted": len(hits),
        "n_closed": len(closed_items),
        "compat": compat,
    }
