"""Generation for evaluation: load a training checkpoint, decode greedily, score.

    python -m evaluate.run --checkpoint runs/demo [--config X] [--split test] --out DIR
        [--swap-images] [--prompt expert] [--dataset kind:path] [--limit N] [--batch-size B]

`--checkpoint` is a `step_N` folder or a run's output_dir (its latest checkpoint); the
checkpoint's own `config.yaml` is the config unless `--config` is given. Ablations:
`--swap-images` gives every question another image (a fixed derangement over the distinct
images), `--prompt` picks a prompt variant (e.g. the "expert radiologist" one), and
`--dataset kind:path` evaluates another dataset (out-of-distribution evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch

from engine.build import build_model
from engine.checkpoint import latest_checkpoint, load_exports
from engine.config import Config, DatasetSpec, load_config
from engine.data.collate import generation_batch
from engine.data.images import ImageLoadError, load_image
from engine.session import build_dataset, fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from evaluate.answers import extract_answer
from evaluate.exact_match import vqa_accuracy
from evaluate.score import score_predictions, write_charts, write_report


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "adapter_model.safetensors").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint folder (adapter_model.safetensors) nor a run with checkpoints/")
    return found


def load_model_for_eval(cfg: Config, checkpoint: Path, device: torch.device | str = "cpu"):
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    model = build_model(cfg, device, log=lambda *_: None)
    load_exports(checkpoint, model)
    return model.eval(), tokenizer


def image_derangement(image_paths: list[str], seed: int = 0) -> dict[str, str]:
    """Map each distinct image to another one: a fixed permutation with no fixed point."""
    distinct = sorted(set(image_paths))
    if len(distinct) < 2:
        raise ValueError("--swap-images needs at least two distinct images")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    return {distinct[order[i]]: distinct[order[(i + 1) % len(order)]] for i in range(len(order))}


@torch.no_grad()
def predict(model, tokenizer, samples, cfg: Config, *, batch_size: int, swap_images: bool = False,
            prompt: str | None = None, device="cpu") -> list[dict]:
    if prompt:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=prompt))
    dataset = build_dataset(samples, cfg, tokenizer, train=False)
    swap = image_derangement([s.image_path for s in samples]) if swap_images else {}
    records = []
    for start in range(0, len(samples), batch_size):
        items = []
        for i in range(start, min(start + batch_size, len(samples))):
            item = dataset[i]
            if "bad" in item:
                records.append(_record(samples[i], "", error=item["bad"]))
                continue
            if swap:
                try:
                    item["pixel_values"] = load_image(swap[samples[i].image_path], cfg.model.image_size)
                except ImageLoadError as e:
                    records.append(_record(samples[i], "", error=str(e)))
                    continue
            items.append(item)
        if not items:
            continue
        batch = generation_batch(items, tokenizer.pad_token_id)
        new_tokens = model.generate(
            batch["pixel_values"].to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
            batch["image_token_mask"].to(device), max_new_tokens=cfg.eval.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        for index, tokens in zip(batch["index"], new_tokens.tolist()):
            reply = tokenizer.decode(tokens, skip_special_tokens=True)
            records.append(_record(samples[index], reply))
    return records


def _record(sample, reply: str, error: str | None = None) -> dict:
    answer_type = sample.meta.get("answer_type", "")
    record = {
        "qid": sample.meta.get("qid"),
        "image": sample.image_path,
        "question": sample.question,
        "answer": sample.answer,
        "reply": reply,
        "prediction": extract_answer(reply, answer_type),
        "answer_type": answer_type,
        "question_type": sample.meta.get("question_type", ""),
        "organ": sample.meta.get("organ", ""),
        "modality": sample.meta.get("modality", ""),
        "task": sample.task,
    }
    if error:
        record["error"] = error
    return record


def eval_specs(cfg: Config, split: str, dataset: str | None) -> list[DatasetSpec]:
    if dataset:
        kind, _, path = dataset.partition(":")
        return [DatasetSpec(kind=kind, path=path, split=split)]
    specs = cfg.data.eval or cfg.data.train
    return [dataclasses.replace(s, split=split) for s in specs]


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, split: str = "test", out_dir: str | Path,
                        swap_images: bool = False, prompt: str | None = None, limit: int | None = None,
                        dataset: str | None = None, batch_size: int | None = None, device: str = "cpu") -> dict:
    """Generate answers for a split, write predictions.jsonl and metrics.json, return metrics."""
    checkpoint = resolve_checkpoint(checkpoint)
    samples = load_samples(eval_specs(cfg, split, dataset), cfg)[:limit]
    model, tokenizer = load_model_for_eval(cfg, checkpoint, device)
    records = predict(model, tokenizer, samples, cfg, batch_size=batch_size or cfg.eval.batch_size,
                      swap_images=swap_images, prompt=prompt, device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    scored = score_predictions([r for r in records if r["task"] == "vqa"])
    scored["n_errors"] = sum(1 for r in records if "error" in r)
    (out / "metrics.json").write_text(json.dumps(scored, indent=2))
    write_report(scored, out)
    write_charts(scored, out)
    return {**scored["pefomed_exact_match"], "n_errors": scored["n_errors"]}


def majority_baseline(train_samples, test_samples) -> dict:
    """Predict, for each answer_type, the most frequent training answer of that type."""
    by_type: dict[str, Counter] = {}
    for s in train_samples:
        by_type.setdefault(s.meta.get("answer_type", ""), Counter())[s.answer.strip().lower()] += 1
    overall = Counter(s.answer.strip().lower() for s in train_samples)
    items = []
    for s in test_samples:
        counts = by_type.get(s.meta.get("answer_type", ""), overall)
        items.append({"prediction": counts.most_common(1)[0][0], "answer": s.answer, **s.meta})
    return vqa_accuracy(items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate answers with a checkpoint and score them")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True)
    parser.add_argument("--swap-images", action="store_true")
    parser.add_argument("--prompt", help="prompt variant: minigptv2, expert, short")
    parser.add_argument("--dataset", help="kind:path of another dataset to evaluate")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg = load_config(args.config or checkpoint / "config.yaml", args.overrides)
    metrics = evaluate_checkpoint(cfg, checkpoint, split=args.split, out_dir=args.out, swap_images=args.swap_images,
                                  prompt=args.prompt, limit=args.limit, dataset=args.dataset,
                                  batch_size=args.batch_size, device=args.device)
    print(json.dumps({k: metrics[k] for k in ("n", "closed", "open", "overall")}, indent=2))


if __name__ == "__main__":
    main()
