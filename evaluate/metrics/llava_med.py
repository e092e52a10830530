"""LLaVA-Med's VQA scores: open-question token recall and closed-question yes/no accuracy.

Taken from microsoft/LLaVA-Med `llava/eval/run_eval.py` and `eval_metrics/` (release ad758b6):
both texts are lower-cased and passed through `normalize_word` (VQA normalization, commas dropped),
then split on whitespace into token counts.

- Open questions: the `recall` of its `calculate_f1score`, tp / (tp + fn), where tp sums the
  *prediction's* counts of the tokens both texts share and fn the reference's counts of the tokens
  the prediction lacks. With no repeated tokens this is the fraction of reference tokens found in
  the prediction; repeats in the prediction can raise it ("left left" vs "left lung" -> 2/3).
  An empty text or no shared token gives 0. Splitting on whitespace only, after normalization,
  matters: "5.5cm" is one token, unlike "5.5 cm"; "three lesions" is "3 lesions".
- Closed questions: a hit when the normalized prediction contains "yes" or "no" as a substring
  *and* contains the normalized reference as a substring.

The counting bug: the published script appended 1 for such a hit, 0 when the prediction contained
neither "yes" nor "no", and **nothing** when it contained "yes"/"no" but not the reference. A wrong
yes/no answer thus left the denominator instead of counting as 0, inflating closed accuracy (all
wrong-but-well-formed answers vanish: a model that always says "yes" scores 100%). The upstream fix
(LLaVA-Med commit b9a98a7, Dec 2023, "fix closed accuracy calculation") appends 0 there. Our
default is the fixed rule; `compat=True` reproduces the published behaviour so that numbers can be
compared with LLaVA-Med's tables, and reports how many items it dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pefomed.evaluate.metrics.normalize import normalize_llava_med
from pefomed.evaluate.metrics.vqa import answer_type_of, references_of


def _normalized(text: str) -> str:
    return normalize_llava_med(str(text).lower())


def _counts(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def open_recall(prediction: str, reference: str) -> float:
    # run_eval.py normalizes both texts, then calculate_f1score normalizes them again.
    pred = _counts(normalize_llava_med(_normalized(prediction)))
    ref = _counts(normalize_llava_med(_normalized(reference)))
    if not pred or not ref:
        return 0.0
    tp = sum(count for word, count in pred.items() if word in ref)
    fn = sum(count for word, count in ref.items() if word not in pred)
    return tp / (tp + fn) if tp else 0.0


def closed_hit(prediction: str, reference: str, compat: bool = False) -> float | None:
    """1.0 / 0.0 for a closed answer; None where the published script appended nothing."""
    pred, ref = _normalized(prediction), _normalized(reference)
    if "yes" in pred or "no" in pred:
        if ref in pred:
            return 1.0
        return None if compat else 0.0
    return 0.0


def llava_med_scores(items: Sequence[dict], compat: bool = False) -> dict:
    """`open_recall` over OPEN items and `closed_accuracy` over CLOSED items (first reference each)."""
    open_items = [it for it in items if answer_type_of(it) == "OPEN"]
    closed_items = [it for it in items if answer_type_of(it) == "CLOSED"]
    recalls = [open_recall(it["prediction"], references_of(it)[0]) for it in open_items]
    hits = [closed_hit(it["prediction"], references_of(it)[0], compat) for it in closed_items]
    counted = [h for h in hits if h is not None]
    return {
        "open_recall": sum(recalls) / len(recalls) if recalls else float("nan"),
        "closed_accuracy": sum(counted) / len(counted) if counted else float("nan"),
        "n_open": len(open_items),
        "n_closed": len(closed_items),
        "n_closed_counted": len(counted),
        "n_closed_dropped": len(hits) - len(counted),
        "compat": compat,
    }
