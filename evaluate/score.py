"""Score predictions the way each paper scores them, side by side (no model needed).

    python -m pefomed.evaluate.score --predictions preds.jsonl [--references refs.json] --out DIR
        [--judge] [--judge-config judge.yaml] [--llava-med-compat] [--no-meteor]

The predictions file is described in `evaluate/predictions.py`. VQA items (`task` "vqa", the
default) get:
- PeFoMed: its VQA normalization, then strict equality; CLOSED / OPEN / overall and per
  question_type, organ and modality (`evaluate/metrics/vqa.py`);
- LLaVA-Med: open token recall and closed yes/no accuracy, their counting bug fixed unless
  `--llava-med-compat` (`evaluate/metrics/llava_med.py`);
- Med-Idefics: containment exact match, token-set F1, BLEU-1 (`evaluate/metrics/med_idefics.py`).
Report items (`task: report`) get BLEU-1..4, METEOR, ROUGE-L and CIDEr-D computed as pycocoevalcap
does (`evaluate/metrics/report_metrics.py`). `--judge` adds PeFoMed's GPT judge
(`evaluate/judge.py`; the API key comes from the environment). The lexical metrics are written
before the judge starts; requests that keep failing (429, 5xx, a refused key, no network) are
counted in the judge section by reason, with a warning on stderr, and the command still succeeds.

Writes to DIR: `metrics.json`, `report.md`, `accuracy_by_answer_type.png`,
`accuracy_by_modality.png` (when items carry a modality) and `scored_items.jsonl` (each item with
its per-scorer results). Python callers use `score_predictions(items, ...)` (metrics only) or
`score_items(items, ...)` (metrics and per-item results) and `evaluate.report.write_outputs`.
Bad input (a missing file, a malformed line, a bad judge config) exits with code 2 and one
`error:` line naming the file, line and field (`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pefomed.errors import run_cli
from pefomed.evaluate.judge import Judge, JudgeConfig, describe_outcome, load_judge_config, run_judge
from pefomed.evaluate.metrics.llava_med import closed_hit, llava_med_scores, open_recall
from pefomed.evaluate.metrics.med_idefics import med_idefics_item, med_idefics_scores
from pefomed.evaluate.metrics.report_metrics import report_metrics
from pefomed.evaluate.metrics.vqa import answer_type_of, references_of, vqa_accuracy
from pefomed.evaluate.predictions import (
    read_predictions,
    validate_items,
    write_predictions,
)
from pefomed.evaluate.report import write_charts, write_outputs, write_report

log = logging.getLogger(__name__)

__all__ = [
    "add_judgments",
    "main",
    "read_predictions",
    "score_file",
    "score_items",
    "score_predictions",
    "write_charts",
    "write_outputs",
    "write_report",
]


def _per_item(item: dict, exact: bool | None, compat: bool) -> dict:
    if item["task"] == "report":
        return {}
    reference = references_of(item)[0]
    idefics = med_idefics_item(item["prediction"], reference)
    scores: dict = {"pefomed_exact_match": exact, **{f"med_idefics_{k}": v for k, v in idefics.items()}}
    if answer_type_of(item) == "OPEN":
        scores["llava_med_open_recall"] = open_recall(item["prediction"], reference)
    elif answer_type_of(item) == "CLOSED":
        scores["llava_med_closed_hit"] = closed_hit(item["prediction"], reference, compat)
    return scores


def _lexical(items: list[dict], *, llava_med_compat: bool, report_tokenizer: str,
             with_meteor: bool) -> tuple[dict, list[dict]]:
    vqa = [it for it in items if it["task"] == "vqa"]
    reports = [it for it in items if it["task"] == "report"]
    metrics: dict = {"n_items": len(items), "n_vqa": len(vqa), "n_report": len(reports)}
    exact_by_item: list[bool | None] = [None] * len(items)
    if vqa:
        pefomed = vqa_accuracy(vqa)
        hits = iter(pefomed.pop("correct"))
        exact_by_item = [next(hits) if it["task"] == "vqa" else None for it in items]
        metrics.update({"pefomed_exact_match": pefomed,
                        "llava_med": llava_med_scores(vqa, compat=llava_med_compat),
                        "med_idefics": med_idefics_scores(vqa)})
    if reports:
        metrics["report_metrics"] = report_metrics([it["prediction"] for it in reports],
                                                   [references_of(it) for it in reports],
                                                   tokenizer=report_tokenizer, with_meteor=with_meteor)
    per_item = [{**it, "scores": _per_item(it, hit, llava_med_compat)} for it, hit in zip(items, exact_by_item)]
    return metrics, per_item


def add_judgments(metrics: dict, per_item: list[dict], judge: JudgeConfig | Judge) -> dict:
    """Run the GPT judge over the items of `per_item`; its section goes into `metrics["judge"]`.

    Request failures are counted in that section (by reason), never raised.
    """
    exact = [bool(row["scores"].get("pefomed_exact_match")) for row in per_item]
    items = [{k: v for k, v in row.items() if k != "scores"} for row in per_item]
    judged = run_judge(items, judge, exact=exact)
    for row, verdict in zip(per_item, judged.pop("verdicts")):
        row["scores"]["judge"] = verdict
    metrics["judge"] = judged
    outcome = describe_outcome(judged)
    if outcome is not None:
        log.warning("%s", outcome)
    return metrics


def score_items(items: Sequence[dict], *, llava_med_compat: bool = False, judge: JudgeConfig | None = None,
                report_tokenizer: str = "auto", with_meteor: bool = True) -> tuple[dict, list[dict]]:
    """(metrics, per-item results) for predictions items (see `evaluate/predictions.py`)."""
    metrics, per_item = _lexical(validate_items(list(items)), llava_med_compat=llava_med_compat,
                                 report_tokenizer=report_tokenizer, with_meteor=with_meteor)
    if judge is not None:
        add_judgments(metrics, per_item, judge)
    return metrics, per_item


def score_predictions(items: Sequence[dict], llava_med_compat: bool = False, *, judge: JudgeConfig | None = None,
                      report_tokenizer: str = "auto", with_meteor: bool = True) -> dict:
    """The metrics dict (what metrics.json holds) for predictions items."""
    return score_items(items, llava_med_compat=llava_med_compat, judge=judge, report_tokenizer=report_tokenizer,
                       with_meteor=with_meteor)[0]


def _write_all(metrics: dict, per_item: list[dict], out: str | Path) -> None:
    write_outputs(metrics, out)
    write_predictions(Path(out) / "scored_items.jsonl", per_item)


def score_file(predictions: str | Path, out: str | Path, *, references: str | Path | None = None,
               llava_med_compat: bool = False, judge: JudgeConfig | None = None, report_tokenizer: str = "auto",
               with_meteor: bool = True) -> dict:
    """Read, score and write every output under `out`; returns the metrics.

    With `judge`, the lexical metrics are written first, then the judge runs and the outputs are
    written again with its section: a judge that fails on every request loses nothing else.
    """
    items = read_predictions(predictions, references)
    client = Judge(judge) if judge is not None else None  # a missing API key fails before any work
    try:
        metrics, per_item = _lexical(items, llava_med_compat=llava_med_compat, report_tokenizer=report_tokenizer,
                                     with_meteor=with_meteor)
        _write_all(metrics, per_item, out)
        if client is not None:
            add_judgments(metrics, per_item, client)
            _write_all(metrics, per_item, out)
    finally:
        if client is not None:
            client.close()
    return metrics


def _summary_line(metrics: dict) -> str:
    from pefomed.evaluate.report import fmt

    parts = []
    if "pefomed_exact_match" in metrics:
        pe = metrics["pefomed_exact_match"]
        parts.append(f"exact match closed {fmt(pe['closed'])} open {fmt(pe['open'])} overall {fmt(pe['overall'])}")
    if "report_metrics" in metrics:
        rep = metrics["report_metrics"]
        parts.append(f"reports BLEU-4 {fmt(rep['bleu4'])} CIDEr {fmt(rep['cider'])}")
    if "judge" in metrics:
        judge = metrics["judge"]
        accuracy = f"judge {fmt(judge['vqa']['accuracy'])} " if "vqa" in judge else "judge "
        parts.append(f"{accuracy}({judge['n_judged']} of {judge['n_items']} items judged)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Score predictions as PeFoMed, LLaVA-Med and Med-Idefics do")
    parser.add_argument("--predictions", required=True, help="a .jsonl file, one item per line")
    parser.add_argument("--references", help="JSON with reference answers (and metadata) keyed by qid")
    parser.add_argument("--out", required=True, help="folder for metrics.json, report.md and the charts")
    parser.add_argument("--llava-med-compat", action="store_true",
                        help="count closed answers as LLaVA-Med's published script did (drops wrong yes/no)")
    parser.add_argument("--judge", action="store_true", help="also ask PeFoMed's GPT judge")
    parser.add_argument("--judge-config", help="YAML of JudgeConfig fields (model, base_url, concurrency, ...)")
    parser.add_argument("--report-tokenizer", choices=("auto", "java", "python"), default="auto",
                        help="PTB tokenizer for report metrics: the Stanford jar (java) or its Python mirror")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it loads a 60 MB paraphrase table)")
    args = parser.parse_args(argv)
    if args.judge_config and not args.judge:
        parser.error("--judge-config needs --judge")
    judge = load_judge_config(args.judge_config) if args.judge else None
    metrics = score_file(args.predictions, args.out, references=args.references,
                         llava_med_compat=args.llava_med_compat, judge=judge,
                         report_tokenizer=args.report_tokenizer, with_meteor=not args.no_meteor)
    print(f"{_summary_line(metrics)} -> {args.out}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_cli(main))
