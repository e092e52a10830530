"""Score predictions in every paper's own way, side by side (no model needed).

    python -m evaluate.score --predictions preds.jsonl --out DIR [--llava-med-compat]

Each line of the predictions file (as `evaluate.run` writes it) holds `question`, `answer`
(the reference), `prediction`, `answer_type` (CLOSED / OPEN) and metadata (`question_type`,
`organ`, `modality`). Reported:
- PeFoMed: VQA-normalized exact match, CLOSED / OPEN / overall, and per question type, organ and
  modality (`evaluate/exact_match.py`);
- LLaVA-Med: open token recall and closed yes/no accuracy, with its counting bug fixed unless
  `--llava-med-compat` (`evaluate/llava_med.py`);
- Med-Idefics: containment exact match, token F1, BLEU-1 (`evaluate/med_idefics.py`);
- for items with `task: report`, pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr
  (`evaluate/report_metrics.py`).
Writes `metrics.json`, `report.md` and PNG bar charts per answer type and per modality.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from evaluate.exact_match import vqa_accuracy
from evaluate.llava_med import llava_med_scores
from evaluate.med_idefics import med_idefics_scores

REQUIRED = ("answer", "prediction")


def read_predictions(path: str | Path, references: str | Path | None = None) -> list[dict]:
    """Predictions (JSON lines); `references` (qid -> answer or list) fills in missing answers."""
    refs = json.loads(Path(references).read_text()) if references else {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: predictions file not found")
    items = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from e
        if "answer" not in item and str(item.get("qid")) in refs:
            item["answer"] = refs[str(item["qid"])]
        missing = [k for k in REQUIRED if k not in item]
        if missing:
            raise ValueError(f"{path}: line {line_no} has no field {missing[0]!r}")
        items.append(item)
    return items


def score_predictions(items: list[dict], llava_med_compat: bool = False) -> dict:
    """VQA items get the three papers' VQA scores; `task: report` items the report metrics."""
    reports = [it for it in items if it.get("task") == "report"]
    vqa = [it for it in items if it.get("task") != "report"]
    metrics = {}
    if vqa:
        # LLaVA-Med's and Med-Idefics' scorers take one reference: the first when there are several.
        first = [{**it, "answer": it["answer"][0]} if isinstance(it["answer"], list) else it for it in vqa]
        metrics.update({
            "pefomed_exact_match": vqa_accuracy(vqa),
            "llava_med": llava_med_scores(first, compat=llava_med_compat),
            "med_idefics": med_idefics_scores(first),
        })
    if reports:
        from evaluate.report_metrics import report_metrics

        refs = [it["answer"] if isinstance(it["answer"], list) else [it["answer"]] for it in reports]
        metrics["report_metrics"] = report_metrics([it["prediction"] for it in reports], refs)
    return metrics


def _fmt(value) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


def write_report(metrics: dict, out: Path) -> None:
    lines = _vqa_lines(metrics) if "pefomed_exact_match" in metrics else []
    if "report_metrics" in metrics:
        rep = metrics["report_metrics"]
        names = ["bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"]
        lines += ["# Report metrics (pycocoevalcap)", "", f"{rep['n']} reports, tokenizer: {rep['tokenizer']}.", "",
                  "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
                  "| " + " | ".join("failed" if rep[k] is None else f"{rep[k]:.4f}" for k in names) + " |", ""]
        if rep.get("meteor_error"):
            lines += [rep["meteor_error"], ""]
    if "judge" in metrics:
        lines += _judge_lines(metrics["judge"])
    (out / "report.md").write_text("\n".join(lines))


def _judge_lines(judge: dict) -> list[str]:
    lines = [f"# GPT judge ({judge['model']})", ""]
    if "vqa" in judge:
        v = judge["vqa"]
        lines += [f"VQA judge accuracy {_fmt(v['judge_accuracy'])} over {v['n_scored']} items "
                  f"({v['n_unparseable']} unparseable replies, not scored).", ""]
        t = v.get("agreement_with_exact_match")
        if t:
            lines += ["| | exact match 1 | exact match 0 |", "|---|---|---|",
                      f"| judge 1 | {t['judge1_em1']} | {t['judge1_em0']} |", f"| judge 0 | {t['judge0_em1']} | {t['judge0_em0']} |", ""]
    if "report" in judge:
        r = judge["report"]
        lines += [f"Report rubric: mean {_fmt(r['mean_score'])} of 4, WASM {_fmt(r['wasm'])}, histogram {r['histogram']}.", ""]
    tok = judge["tokens"]
    lines += [f"Tokens spent: {tok['prompt']} prompt + {tok['completion']} completion in {tok['requests']} requests.", ""]
    return lines


def _vqa_lines(metrics: dict) -> list[str]:
    pe, lm, mi = metrics["pefomed_exact_match"], metrics["llava_med"], metrics["med_idefics"]
    lines = [
        "# VQA scores", "",
        f"{pe['n']} items ({pe['n_closed']} closed, {pe['n_open']} open).", "",
        "| scorer | closed | open | overall |", "|---|---|---|---|",
        f"| PeFoMed exact match (VQA normalization) | {_fmt(pe['closed'])} | {_fmt(pe['open'])} | {_fmt(pe['overall'])} |",
        f"| LLaVA-Med (closed yes/no acc., open recall) | {_fmt(lm['closed_accuracy'])} | {_fmt(lm['open_recall'])} | |",
        f"| Med-Idefics containment EM | | | {_fmt(mi['containment_em'])} |",
        f"| Med-Idefics token F1 | | | {_fmt(mi['token_f1'])} |",
        f"| Med-Idefics BLEU-1 | | | {_fmt(mi['bleu1'])} |", "",
        ("LLaVA-Med compat mode: wrong yes/no answers are dropped from the closed denominator, as in "
         "their published script." if lm["compat"] else
         "LLaVA-Med closed accuracy counts wrong yes/no answers as 0 (their script drops them; "
         "`--llava-med-compat` reproduces that)."), "",
    ]
    for field in ("question_type", "organ", "modality"):
        groups = pe.get(f"by_{field}")
        if groups:
            lines += [f"## By {field}", "", "| value | n | exact match |", "|---|---|---|"]
            lines += [f"| {k} | {v['n']} | {_fmt(v['accuracy'])} |" for k, v in groups.items()] + [""]
    return lines


def write_charts(metrics: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "pefomed_exact_match" not in metrics:
        return []
    pe = metrics["pefomed_exact_match"]
    charts = {"answer_type": {"CLOSED": pe["closed"], "OPEN": pe["open"], "overall": pe["overall"]}}
    if pe.get("by_modality"):
        charts["modality"] = {k: v["accuracy"] for k, v in pe["by_modality"].items()}
    paths = []
    for name, values in charts.items():
        fig, ax = plt.subplots(figsize=(4 + 0.4 * len(values), 3))
        ax.bar(list(values), [0 if math.isnan(v) else v for v in values.values()], color="#4c72b0")
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact match")
        ax.set_title(f"accuracy by {name}")
        fig.tight_layout()
        path = out / f"accuracy_by_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def run_judge(items: list[dict], config_path: str | None) -> dict:
    from evaluate.exact_match import exact_match
    from evaluate.judge import Judge, JudgeConfig, summarize

    cfg = JudgeConfig()
    if config_path:
        import yaml

        from engine.config import from_dict

        cfg = from_dict(JudgeConfig, yaml.safe_load(Path(config_path).read_text()) or {}, source=config_path)
    judge = Judge(cfg)
    out = {"model": cfg.model}
    vqa = [it for it in items if it.get("task") != "report"]
    reports = [it for it in items if it.get("task") == "report"]
    if vqa:
        exact = [exact_match(it["prediction"], it["answer"]) for it in vqa]
        out["vqa"] = summarize("vqa", vqa, judge.judge_all("vqa", vqa), exact)
    if reports:
        out["report"] = summarize("report", reports, judge.judge_all("report", reports))
    out["tokens"] = {"prompt": judge.prompt_tokens, "completion": judge.completion_tokens, "requests": judge.requests}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Score VQA predictions as PeFoMed, LLaVA-Med and Med-Idefics do")
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--references", help="JSON mapping qid -> reference answer(s), for predictions without answers")
    parser.add_argument("--llava-med-compat", action="store_true")
    parser.add_argument("--judge", action="store_true", help="also ask the GPT judge (evaluate/judge.py)")
    parser.add_argument("--judge-config", help="YAML with JudgeConfig fields: model, base_url, concurrency, ...")
    args = parser.parse_args(argv)
    items = read_predictions(args.predictions, args.references)
    metrics = score_predictions(items, args.llava_med_compat)
    if args.judge:
        metrics["judge"] = run_judge(items, args.judge_config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(metrics, out)
    write_charts(metrics, out)
    if "pefomed_exact_match" in metrics:
        pe = metrics["pefomed_exact_match"]
        print(f"closed {_fmt(pe['closed'])}  open {_fmt(pe['open'])}  overall {_fmt(pe['overall'])}")
    if "report_metrics" in metrics:
        rep = metrics["report_metrics"]
        print("reports: " + "  ".join(f"{k} {rep[k]:.4f}" for k in ("bleu1", "bleu4", "rouge_l", "cider") ))
    print(f"-> {out}")
    return metrics


if __name__ == "__main__":
    main()
