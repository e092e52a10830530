"""LLaVA-Med's VQA scores: token recall for open questions, yes/no accuracy for closed ones.

LLaVA-Med's published script (`llava/eval/run_eval.py`) scores a closed answer 1 when the
prediction contains "yes" or "no" *and* the reference; when it contains "yes" or "no" but not
the reference (a wrong yes/no answer) it appends nothing, so wrong answers drop out of the
denominator and closed accuracy is inflated. Our default counts them as 0;
`compat=True` reproduces the published behaviour for comparison with their tables.
Open recall is the share of the reference's tokens (lower-cased, punctuation removed) found in
the prediction.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def open_recall(prediction: str, answer: str) -> float:
    ref = set(_tokens(answer))
    if not ref:
        return 0.0
    return len(ref & set(_tokens(prediction))) / len(ref)


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
