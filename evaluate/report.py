"""What `evaluate.score` writes: metrics.json, report.md (markdown tables) and PNG bar charts.

`metrics` is the dict `evaluate.score.score_predictions` returns. NaN (a group with no items)
is written as null in JSON and "n/a" in the tables. Charts (matplotlib, Agg backend):
`accuracy_by_answer_type.png` (CLOSED / OPEN / overall for every VQA scorer present) and
`accuracy_by_modality.png` (PeFoMed exact match per modality, when the items carry a modality).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pefomed.evaluate.predictions import write_text_atomic

LLAVA_MED_NOTE = (
    "LLaVA-Med's published `run_eval.py` appended nothing for a closed answer that said yes/no but not "
    "the reference, so wrong yes/no answers left the denominator and closed accuracy was inflated "
    "(their upstream fix b9a98a7 counts them as 0). {mode}")
LLAVA_MED_FIXED = "Here they count as 0; `--llava-med-compat` reproduces the published number."
LLAVA_MED_COMPAT = ("This run uses `--llava-med-compat`: {dropped} wrong yes/no answers were dropped, as in the "
                    "published script; the number is comparable with LLaVA-Med's tables, not with a correct accuracy.")
CONTAINMENT_NOTE = ("Med-Idefics' exact match is containment: the reference occurring anywhere in the prediction "
                    "counts (\"no\" is found in \"normal\").")


def json_safe(value):
    """`value` with NaN / inf floats replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_metrics_json(metrics: dict, out: Path) -> Path:
    return write_text_atomic(Path(out) / "metrics.json", json.dumps(json_safe(metrics), indent=2, allow_nan=False))


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _vqa_section(metrics: dict) -> list[str]:
    pe, lm, mi = metrics["pefomed_exact_match"], metrics["llava_med"], metrics["med_idefics"]
    rows = [["PeFoMed exact match (VQA normalization)", pe["closed"], pe["open"], pe["overall"]],
            ["LLaVA-Med (closed: yes/no accuracy, open: token recall)", lm["closed_accuracy"], lm["open_recall"], None],
            ["Med-Idefics containment EM", None, None, mi["containment_em"]],
            ["Med-Idefics token F1", None, None, mi["token_f1"]],
            ["Med-Idefics BLEU-1", None, None, mi["bleu1"]]]
    judge = metrics.get("judge", {}).get("vqa")
    if judge:
        rows.append([f"GPT judge ({metrics['judge']['model']})", judge["closed"], judge["open"], judge["accuracy"]])
    mode = (LLAVA_MED_COMPAT.format(dropped=lm["n_closed_dropped"]) if lm["compat"] else LLAVA_MED_FIXED)
    lines = ["# VQA", "", f"{pe['n']} items: {pe['n_closed']} closed, {pe['n_open']} open.", ""]
    lines += _table(["scorer", "closed", "open", "overall"], rows)
    lines += [LLAVA_MED_NOTE.format(mode=mode), "", CONTAINMENT_NOTE, "",
              f"Med-Idefics tokenizer: {mi['tokenizer']}.", ""]
    for field in ("question_type", "organ", "modality"):
        groups = pe.get(f"by_{field}")
        if groups:
            lines += [f"## PeFoMed exact match by {field}", ""]
            lines += _table(["value", "n", "accuracy"], [[k, v["n"], v["accuracy"]] for k, v in groups.items()])
    return lines


def _report_section(rep: dict) -> list[str]:
    names = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"]
    lines = ["# Report generation", "", f"{rep['n']} reports; tokenizer: {rep['tokenizer']}.", ""]
    lines += _table(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"],
                    [["failed" if rep.get(k) is None else rep[k] for k in names]])
    if rep.get("meteor_error"):
        lines += [f"METEOR: {rep['meteor_error']}", ""]
    return lines


def _reasons(counts: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.items())


def _judge_section(judge: dict) -> list[str]:
    where = f" at {judge['base_url']}" if judge.get("base_url") else ""
    lines = ["# GPT judge", "", f"Model `{judge['model']}`{where}, PeFoMed's prompts.", "",
             f"{judge['n_judged']} of {judge['n_items']} items judged; {judge['n_failed']} failed, "
             f"{judge['n_unparseable']} unparseable.", ""]
    if judge["failures"]:
        lines += [f"Failed requests by reason: {_reasons(judge['failures'])}.", ""]
    if judge.get("n_withheld"):
        why = judge.get("restricted", {}).get("why", "")
        lines += [f"{judge['n_withheld']} restricted items (credentialed data) were withheld from this non-local "
                  f"endpoint and not judged{': ' + why if why else ''}.", ""]
    if judge.get("stopped"):
        lines += [f"The judge stopped early: {judge['stopped']}", ""]
    vqa = judge.get("vqa")
    if vqa:
        lines += ["## VQA (1 = matches or good enough)", ""]
        lines += _table(["scored", "unparseable", "failed", "cached", "accuracy", "closed", "open"],
                        [[vqa["n_scored"], vqa["n_unparseable"], vqa["n_failed"], vqa["n_cached"], vqa["accuracy"],
                          vqa["closed"], vqa["open"]]])
        if vqa["unparseable_reasons"]:
            lines += [f"Unparseable replies by reason: {_reasons(vqa['unparseable_reasons'])}.", ""]
        table = vqa.get("vs_exact_match")
        if table and vqa["n_scored"]:
            lines += ["Agreement with PeFoMed exact match (scored items):", ""]
            lines += _table(["", "exact match 1", "exact match 0"],
                            [["judge 1", table["judge_1_exact_1"], table["judge_1_exact_0"]],
                             ["judge 0", table["judge_0_exact_1"], table["judge_0_exact_0"]]])
            lines += [f"Agreement: {fmt(table['agreement'])}.", ""]
    rep = judge.get("report")
    if rep:
        lines += ["## Reports (0-4 rubric)", ""]
        lines += _table(["scored", "unparseable", "failed", "0", "1", "2", "3", "4", "mean", "WASM"],
                        [[rep["n_scored"], rep["n_unparseable"], rep["n_failed"],
                          *[rep["histogram"][str(k)] for k in range(5)], rep["mean_score"], rep["wasm"]]])
        if rep["unparseable_reasons"]:
            lines += [f"Unparseable replies by reason: {_reasons(rep['unparseable_reasons'])}.", ""]
        lines += [f"WASM weights per level 0-4: {rep['wasm_weights']}.", ""]
    tokens = judge["tokens"]
    lines += [(f"HTTP requests {tokens['requests']} (retries {tokens['retries']}), cache hits {tokens['cache_hits']}; "
               f"tokens: {tokens['prompt_tokens']} prompt, {tokens['completion_tokens']} completion"
               + (f" (lower bounds: {tokens['responses_without_usage']} responses carried no usage)"
                  if tokens["responses_without_usage"] else "") + "."), ""]
    return lines


def write_report(metrics: dict, out: Path) -> Path:
    lines: list[str] = []
    if "pefomed_exact_match" in metrics:
        lines += _vqa_section(metrics)
    if "report_metrics" in metrics:
        lines += _report_section(metrics["report_metrics"])
    if "judge" in metrics:
        lines += _judge_section(metrics["judge"])
    return write_text_atomic(Path(out) / "report.md", "\n".join(lines))


def _bar_chart(path: Path, groups: list[str], series: dict[str, list], title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(len(series), 1) * 0.6 + 2), 3.5))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        heights = [0.0 if v is None or math.isnan(v) else v for v in values]
        ax.bar(xs, heights, width=width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_charts(metrics: dict, out: Path) -> list[Path]:
    if "pefomed_exact_match" not in metrics:
        return []
    out = Path(out)
    pe, lm = metrics["pefomed_exact_match"], metrics["llava_med"]
    series = {"PeFoMed exact match": [pe["closed"], pe["open"], pe["overall"]],
              "LLaVA-Med (closed acc., open recall)": [lm["closed_accuracy"], lm["open_recall"], None]}
    judge = metrics.get("judge", {}).get("vqa")
    if judge:
        series["GPT judge"] = [judge["closed"], judge["open"], judge["accuracy"]]
    paths = [_bar_chart(out / "accuracy_by_answer_type.png", ["CLOSED", "OPEN", "overall"], series,
                        "VQA accuracy by answer type", "score")]
    by_modality = pe.get("by_modality")
    if by_modality:
        paths.append(_bar_chart(out / "accuracy_by_modality.png", list(by_modality),
                                {"PeFoMed exact match": [v["accuracy"] for v in by_modality.values()]},
                                "PeFoMed exact match by modality", "accuracy"))
    return paths


def write_outputs(metrics: dict, out: str | Path) -> list[Path]:
    """metrics.json, report.md and the charts under `out` (created); returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [write_metrics_json(metrics, out), write_report(metrics, out), *write_charts(metrics, out)]
