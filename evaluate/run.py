"""Evaluation: load a training checkpoint, decode greedily in batches, write and score predictions.

    python -m pefomed.evaluate.run --checkpoint runs/demo --split test --out runs/demo/eval
        [--config X] [--swap-images] [--prompt expert] [--dataset kind:path] [--limit N]
        [--batch-size B] [--device cpu|cuda] [key=value overrides]

`--checkpoint` is a `step_N` folder or a run's output_dir (its latest complete checkpoint is
used); a folder without its `COMPLETE` marker, or still named `step_N.tmp`, is refused. The base
model is built from the config (the checkpoint's own `config.yaml` unless `--config` is given),
then the checkpoint's LoRA adapter and projection are loaded into it.
Prompts use the evaluation template `eval.prompt` (MiniGPT-v2's by default), never
`data.template` (training's); decoding is greedy with a KV cache, left-padded batches of
`eval.batch_size`, `eval.max_new_tokens` at most, stopping at EOS or, for LLaMA-3 tokenizers, at
`<|eot_id|>` / `<|end_of_text|>`. Before the model is loaded, a split whose images are all missing
is an error (a wrong path or image_root); a few missing ones are a warning. The answer is taken from each reply by `evaluate/answers.py`.

Ablations:
- `--swap-images`: every question is asked about another image. The distinct images are permuted
  by a fixed derangement (a seeded random cyclic permutation, so no image maps to itself), so a
  question never sees its own image even when several questions share one image.
- `--prompt NAME`: another prompt variant of `engine/data/prompts.py` (e.g. `expert`, Med-Idefics'
  "expert radiologist" prompt).
- `--dataset kind:path` with `--split`: any dataset and split, e.g. out-of-distribution PathVQA.

Writes `predictions.jsonl` (one JSON object per item, in the schema of `evaluate/predictions.py`:
see `prediction_record`), then scores that file with `evaluate.score` into `metrics.json`,
`report.md`, charts and `scored_items.jsonl`; prints and returns the closed / open / overall
exact-match summary. A user's mistake (a missing or incomplete checkpoint, a split the dataset
does not have, a bad option) is one `error:` line and exit status 2 (`pefomed.errors.run_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import (
    COMPLETE_MARK,
    CheckpointError,
    apply_exports,
    latest_checkpoint,
    read_exports,
    require_complete,
)
from pefomed.engine.config import Config, ConfigError, DatasetSpec, load_config
from pefomed.engine.data.collate import generation_batch
from pefomed.engine.data.prompts import VQA_INSTRUCTIONS
from pefomed.engine.data.readers import DataError, Sample
from pefomed.engine.data.sources import (
    build_dataset,
    fit_vocab_to_tokenizer,
    load_run_tokenizer,
    load_samples,
)
from pefomed.errors import run_cli
from pefomed.evaluate import predictions, score
from pefomed.evaluate.answers import clean_reply, extract_answer
from pefomed.evaluate.predictions import ANSWER_TYPES

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("adapter_model.safetensors", "projection.safetensors")
SWAP_SEED = 0
# LLaMA-3 chat ends a turn with <|eot_id|>, Idefics2 with <end_of_utterance>, not with the
# tokenizer's EOS.
EXTRA_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<end_of_utterance>")


# ---------------------------------------------------------------- checkpoint and model


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete `step_N` folder as given, or a run's output_dir -> its latest complete checkpoint.

    A folder still named `*.tmp` (being written, or left by a crash) or without its `COMPLETE`
    marker is refused (`engine.checkpoint.require_complete`): its files may be half-written.
    Raises FileNotFoundError or CheckpointError naming the folder and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found (give a step_N folder or a run's output_dir)")
    if (path / "checkpoints").is_dir() and not path.name.endswith(".tmp"):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path / 'checkpoints'}: no complete step_N checkpoint in this run (none has its "
                                  f"{COMPLETE_MARK} marker); let the run save one, or pass a checkpoint folder")
        path = found
    elif not path.name.endswith(".tmp") and not (path / COMPLETE_MARK).exists() and not any(
            (path / name).exists() for name in CHECKPOINT_FILES):
        raise CheckpointError(
            f"{path}: neither a checkpoint folder (no {' or '.join(CHECKPOINT_FILES)}) nor a run's "
            "output_dir (no checkpoints/)")
    path = require_complete(path)
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from the checkpoint folder; copy the whole step_N folder "
                                  "from the training run again")
    return path


def load_eval_config(checkpoint: Path, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """`config` if given, else the checkpoint's own `config.yaml`."""
    path = Path(config) if config else checkpoint / "config.yaml"
    if not path.is_file():
        hint = "" if config else "; pass --config with the run's config"
        raise FileNotFoundError(f"{path}: config file not found{hint}")
    return load_config(path, list(overrides))


def resolve_device(cfg: Config, device: str | torch.device | None = None) -> torch.device:
    choice = str(device) if device is not None else cfg.train.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {choice!r} (--device / train.device) asked for, but no CUDA device is available; "
                          "use --device cpu")
    return torch.device(choice)


def load_model_for_eval(cfg: Config, checkpoint: Path, device: str | torch.device = "cpu"):
    """The base model of `cfg` with the checkpoint's adapter and projection; and the tokenizer."""
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    exports = read_exports(Path(checkpoint))  # a damaged checkpoint fails before the model is built
    model = build_model(cfg, device)
    apply_exports(model, exports, Path(checkpoint))
    return model.eval(), tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS, and LLaMA-3's end-of-turn tokens when it has them."""
    vocab = tokenizer.get_vocab()
    return sorted({tokenizer.eos_token_id, *(vocab[t] for t in EXTRA_STOP_TOKENS if t in vocab)})


# ---------------------------------------------------------------- ablations


def derangement(n: int, seed: int = SWAP_SEED) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (Sattolo's cyclic shuffle)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: the result is one n-cycle, so nothing stays in place
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def image_derangement(image_paths: Sequence[str], seed: int = SWAP_SEED) -> dict[str, str]:
    """Each distinct image -> the image its questions are asked about instead (never itself)."""
    distinct = sorted(set(image_paths))
    if len(distinct) < 2:
        raise DataError(f"--swap-images needs at least two distinct images, the split has {len(distinct)}; "
                        "evaluate more items (--limit) or drop --swap-images")
    perm = derangement(len(distinct), seed)
    return {image: distinct[perm[i]] for i, image in enumerate(distinct)}


def eval_specs(cfg: Config, split: str, dataset: str | None = None) -> list[DatasetSpec]:
    """The datasets to evaluate: `kind:path` if given, else data.eval (or data.train), at `split`."""
    if dataset:
        kind, sep, path = dataset.partition(":")
        if not sep or not kind or not path:
            raise ConfigError(f"--dataset {dataset!r}: expected kind:path, e.g. pathvqa:/data/pathvqa")
        return [DatasetSpec(kind=kind, path=path, split=split)]
    specs = cfg.data.eval or cfg.data.train
    if not specs:
        raise ConfigError("the config names no dataset (data.eval / data.train); pass --dataset kind:path")
    return [dataclasses.replace(s, split=split) for s in specs]


def eval_template(cfg: Config, prompt: str | None = None) -> str:
    """The prompt variant to evaluate with: `prompt` if given, else eval.prompt; checked."""
    template = prompt or cfg.eval.prompt
    if template not in VQA_INSTRUCTIONS:
        raise ConfigError(f"prompt variant {template!r} (--prompt / eval.prompt): expected one of "
                          f"{', '.join(VQA_INSTRUCTIONS)}")
    return template


# ---------------------------------------------------------------- generation


@torch.no_grad()
def decode_batch(model, tokenizer, batch: dict, *, max_new_tokens: int, device: torch.device | str,
                 stop_ids: list[int] | None = None) -> list[str]:
    """Greedy replies, decoded, for a left-padded generation batch (`engine.data.collate`)."""
    extra = {}
    if "pixel_attention_mask" in batch:  # Idefics2: images of their own sizes, padded
        extra["pixel_attention_mask"] = batch["pixel_attention_mask"].to(device)
    new_tokens = model.generate(
        batch["pixel_values"].to(device),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["image_token_mask"].to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids or [tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens.tolist()]


def prediction_record(sample: Sample, reply: str, *, image_used: str, prompt: str, error: str | None = None) -> dict:
    """One line of predictions.jsonl, in the schema of `evaluate/predictions.py`.

    `answer` is the reference and `prediction` the answer extracted from `reply` (a caption or a
    report is kept whole, as `task: report`); `image` is the item's own image and `image_used` the
    one the model saw (they differ under --swap-images); `prompt` names the template.
    """
    answer_type = str(sample.meta.get("answer_type", "")).upper()
    is_vqa = sample.task == "vqa"
    record = {
        "qid": sample.meta.get("qid"),
        "task": "vqa" if is_vqa else "report",
        "prompt_kind": sample.task,
        "question": sample.question,
        "answer": sample.answer,
        "prediction": extract_answer(reply, answer_type, sample.question) if is_vqa else clean_reply(reply),
        "reply": reply,
        "answer_type": answer_type if answer_type in ANSWER_TYPES else "",
        "question_type": sample.meta.get("question_type", ""),
        "organ": sample.meta.get("organ", ""),
        "modality": sample.meta.get("modality", ""),
        "image": sample.image_path,
        "image_used": image_used,
        "prompt": prompt,
    }
    if sample.meta.get("restricted"):
        # Credentialed data (MIMIC-CXR): the judge sends it only to a local endpoint.
        record["restricted"] = True
    if error is not None:
        record["error"] = error
    return record


def predict(model, tokenizer, samples: list[Sample], cfg: Config, *, batch_size: int | None = None,
            swap_images: bool = False, prompt: str | None = None, device: torch.device | str = "cpu",
            progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One prediction record per sample, in the samples' order.

    An item whose image cannot be read (or whose prompt is too long) gets an empty prediction and
    an `error` field: it counts as wrong, so a broken file cannot raise the accuracy.
    """
    template = eval_template(cfg, prompt)
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=template))
    swap = image_derangement([s.image_path for s in samples]) if swap_images else {}
    shown = [dataclasses.replace(s, image_path=swap.get(s.image_path, s.image_path)) for s in samples]
    dataset = build_dataset(shown, run_cfg, tokenizer, train=False)
    batch_size = batch_size or cfg.eval.batch_size
    stop_ids = stop_token_ids(tokenizer)
    records: list[dict | None] = [None] * len(samples)
    for start in range(0, len(samples), batch_size):
        items = []
        for i in range(start, min(start + batch_size, len(samples))):
            item = dataset[i]
            if "bad" in item:
                records[i] = prediction_record(samples[i], "", image_used=shown[i].image_path, prompt=template,
                                               error=item["bad"])
            else:
                items.append(item)
        if items:
            batch = generation_batch(items, tokenizer.pad_token_id)
            replies = decode_batch(model, tokenizer, batch, max_new_tokens=cfg.eval.max_new_tokens, device=device,
                                   stop_ids=stop_ids)
            for i, reply in zip(batch["index"], replies):
                records[i] = prediction_record(samples[i], reply, image_used=shown[i].image_path, prompt=template)
        if progress is not None:
            progress(min(start + batch_size, len(samples)), len(samples))
    return records


# ---------------------------------------------------------------- whole evaluation


def summarize(metrics: dict, records: list[dict]) -> dict:
    """The JSON-safe summary that the demo prints: exact match closed / open / overall."""
    summary: dict = {"n": len(records), "n_errors": sum(1 for r in records if "error" in r)}
    exact = metrics.get("pefomed_exact_match")
    if exact:
        summary.update({k: exact[k] for k in ("n_closed", "n_open", "closed", "open", "overall") if k in exact})
    if "report_metrics" in metrics:
        summary["report_metrics"] = metrics["report_metrics"]
    return summary


def check_images(samples: Sequence[Sample]) -> None:
    """Before the model is loaded: no image at all found is an error (a wrong path or image_root);
    some missing is a warning (those items are counted wrong)."""
    missing = [s.image_path for s in samples if not Path(s.image_path).is_file()]
    if samples and len(missing) == len(samples):
        raise DataError(f"{missing[0]}: image file not found, nor any of the other {len(samples) - 1} images of the "
                        "split; check the dataset path, or set image_root for the dataset in the config")
    if missing:
        log.warning("%d of %d images not found (the first: %s); those items get an empty prediction and count as "
                    "wrong", len(missing), len(samples), missing[0])


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, *, split: str = "test", out_dir: str | Path,
                        swap_images: bool = False, prompt: str | None = None, limit: int | None = None,
                        dataset: str | None = None, batch_size: int | None = None,
                        device: str | torch.device | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Generate answers for `split`, write predictions.jsonl and metrics.json into `out_dir`.

    Returns `{n, n_errors, n_closed, n_open, closed, open, overall}` (exact match, PeFoMed's
    normalization), plus `report_metrics` when the split holds reports.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    eval_template(cfg, prompt)  # a typo fails before a 7B model is loaded
    samples = load_samples(eval_specs(cfg, split, dataset), cfg)
    if limit is not None:
        samples = samples[:limit]
    check_images(samples)
    run_device = resolve_device(cfg, device)
    model, tokenizer = load_model_for_eval(cfg, checkpoint, run_device)
    records = predict(model, tokenizer, samples, cfg, batch_size=batch_size, swap_images=swap_images,
                      prompt=prompt, device=run_device, progress=progress)
    path = predictions.write_predictions(Path(out_dir) / "predictions.jsonl",
                                         predictions.validate_items(records, "evaluate.run"))
    # Scored from the file as written, so metrics.json always agrees with `evaluate.score` on it.
    return summarize(score.score_file(path, out_dir), records)


def majority_baseline(train_samples: Sequence[Sample], test_samples: Sequence[Sample], *,
                      by: str = "answer_type") -> dict:
    """Accuracy of answering every test question with the most frequent training answer.

    The answer is chosen per `by` group (`answer_type`: one answer for CLOSED, one for OPEN, as
    the demo's README reports; `question_type`: one per question type, a stronger baseline). A
    group that training never saw falls back to the most frequent answer overall; ties go to the
    answer seen first. Scored with the same exact match as the model.
    """
    if not train_samples:
        raise ValueError("majority_baseline needs training samples")
    groups: dict[str, Counter] = {}
    for s in train_samples:
        groups.setdefault(str(s.meta.get(by, "")), Counter())[s.answer.strip().lower()] += 1
    overall = Counter(s.answer.strip().lower() for s in train_samples)
    items = []
    for s in test_samples:
        counts = groups.get(str(s.meta.get(by, "")), overall)
        items.append({**s.meta, "task": "vqa", "answer_type": str(s.meta.get("answer_type", "")).upper(),
                      "prediction": counts.most_common(1)[0][0], "answer": s.answer})
    return score.score_predictions(items)["pefomed_exact_match"]


# ---------------------------------------------------------------- command line


def _print_progress(done: int, total: int) -> None:
    print(f"\r{done}/{total} items", end="" if done < total else "\n", file=sys.stderr, flush=True)


def _null_nan(summary: dict) -> dict:
    """NaN (no item of that answer type) as JSON null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate answers with a training checkpoint and score them")
    parser.add_argument("--checkpoint", required=True, help="a step_N folder or a run's output_dir")
    parser.add_argument("--config", help="run config (default: the checkpoint's config.yaml)")
    parser.add_argument("--split", default="test",
                        help="train, val or test, read as named; a split the dataset lacks is an error")
    parser.add_argument("--out", required=True, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--swap-images", action="store_true", help="ask each question about another image")
    parser.add_argument("--prompt", help="prompt variant from engine/data/prompts.py (minigptv2, expert, short)")
    parser.add_argument("--dataset", help="kind:path of the dataset to evaluate instead of data.eval")
    parser.add_argument("--limit", type=int, help="evaluate the first N items only")
    parser.add_argument("--batch-size", type=int, help="default: eval.batch_size")
    parser.add_argument("--device", help="cpu or cuda (default: train.device of the config)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.max_new_tokens=10")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg = load_eval_config(checkpoint, args.config, args.overrides)
    summary = evaluate_checkpoint(
        cfg, checkpoint, split=args.split, out_dir=args.out, swap_images=args.swap_images, prompt=args.prompt,
        limit=args.limit, dataset=args.dataset, batch_size=args.batch_size, device=args.device,
        progress=_print_progress if sys.stderr.isatty() else None,
    )
    print(json.dumps(_null_nan(summary), indent=2))
    log.info("-> %s", Path(args.out) / "predictions.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
