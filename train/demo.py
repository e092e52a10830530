"""The embedded demo: a real pretrained LLM learns to answer questions about synthetic images.

`make demo` (`pefomed demo`, or `python -m pefomed.train.demo --config configs/demo_smollm2.yaml`)
generates a synthetic VQA dataset (`data.synthetic_family`: radiology, or shapes; `--family shapes`
also gives the dataset folders and the run folder a `_shapes` suffix), fine-tunes
SmolLM2-135M-Instruct (the folder `pefomed fetch smollm2` builds) with LoRA and the grouped
projection behind a small ViT, and evaluates the held-out split three ways: the trained model,
the same model with the images swapped across questions, and the majority-answer baseline. It
prints the table, a few replies, and the wall and CPU time of training and of the whole run.

No vision weights can be downloaded offline, so the ViT starts from random weights and trains
with the projection (`model.train_vision`). On the radiology family the recipe learns what the image shows,
not only the answers' priors, thanks to the connector's scale at init (`model.connector_init:
match_embeddings`) and its own learning rate (`optim.connector_lr`); on the shapes family it
does not yet. docs/demo.md has the diagnosis, the ablations and the figures.
`configs/demo.yaml` is the all-random tiny variant that the tests use.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from pefomed.engine.config import Config, load_config
from pefomed.engine.data import synthetic
from pefomed.engine.data.sources import load_samples
from pefomed.errors import UserError, run_cli

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/demo_smollm2.yaml"
N_EXAMPLES = 4


class DemoError(UserError, RuntimeError):
    """The demo cannot start as configured; the message names the fix."""


def check_llm(cfg: Config) -> None:
    """A pretrained `model.llm` must be a model folder; the default one is built by `pefomed fetch`."""
    if cfg.model.random_init or cfg.model.arch == "idefics2":
        return
    folder = Path(cfg.model.llm)
    if not (folder / "config.json").is_file():
        raise DemoError(
            f"model.llm={cfg.model.llm}: no config.json there; build SmolLM2-135M-Instruct with `make smollm2` "
            f"(`pefomed fetch smollm2 --out {cfg.model.llm}`), or point model.llm at a Hugging Face LLaMA folder"
        )


def prepare_data(cfg: Config) -> None:
    """Generate every synthetic dataset of the run as `data.synthetic_family` (kept when there)."""
    for spec in [*cfg.data.train, *cfg.data.eval]:
        if spec.kind == "synthetic":
            synthetic.ensure_family(spec.path, cfg.data.synthetic_family, n_train=cfg.data.synthetic_train,
                                    n_test=cfg.data.synthetic_test, image_size=cfg.model.image_size,
                                    seed=cfg.train.seed)


def for_family(cfg: Config, family: str) -> Config:
    """`cfg` for the synthetic `family`: its synthetic datasets and the run folder get a `_<family>`
    suffix, so that the families' data and checkpoints never mix (a run folder would resume); the
    other datasets read from those folders (their captions) and a tokenizer built inside one (the
    random-init demo's) move with them."""
    if family == cfg.data.synthetic_family:
        return cfg
    folders = {s.path for s in [*cfg.data.train, *cfg.data.eval] if s.kind == "synthetic"}

    def moved(specs):
        return [dataclasses.replace(s, path=f"{s.path}_{family}") if s.path in folders else s for s in specs]

    data = dataclasses.replace(cfg.data, synthetic_family=family, train=moved(cfg.data.train), eval=moved(cfg.data.eval))
    align = dataclasses.replace(cfg.align, data=moved(cfg.align.data))
    train = dataclasses.replace(cfg.train, output_dir=f"{cfg.train.output_dir}_{family}")
    model = cfg.model
    tokenizer = Path(model.tokenizer) if model.tokenizer else None
    for folder in folders:
        if tokenizer is not None and tokenizer.is_relative_to(folder):
            moved_to = Path(f"{folder}_{family}") / tokenizer.relative_to(folder)
            model = dataclasses.replace(model, tokenizer=str(moved_to))
    return dataclasses.replace(cfg, model=model, data=data, align=align, train=train)


def vqa_train_and_test(cfg: Config) -> tuple[list, list]:
    """The questions (not the captions a recipe may mix in) of the training sets' train and test
    splits: what the majority-answer baseline is drawn from and scored on."""
    specs = [s for s in cfg.data.train if s.kind != "caption"]
    train = [s for s in load_samples(specs, cfg) if s.prompt_kind == "vqa"]
    test = [s for s in load_samples([dataclasses.replace(s, split="test") for s in specs], cfg) if s.prompt_kind == "vqa"]
    return train, test


def machine() -> dict:
    import torch

    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def examples(predictions: Path, n: int = N_EXAMPLES) -> list[dict]:
    """The first `n` held-out items' question, reference and the model's whole reply."""
    rows = [json.loads(line) for line in predictions.read_text().splitlines()[:n]]
    return [{k: r[k] for k in ("image", "question", "answer", "reply")} for r in rows]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--family", choices=synthetic.FAMILIES,
                        help="the synthetic family to run, in its own data and run folders (see for_family)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.family:
        cfg = for_family(cfg, args.family)
    check_llm(cfg)

    wall, cpu = time.perf_counter(), time.process_time()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        prepare_data(cfg)
    from pefomed.engine.session import train_from_config

    train_from_config(cfg)
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    if rank != 0:
        return {}  # under torchrun, rank 0 alone evaluates and reports

    from pefomed.engine.checkpoint import latest_checkpoint
    from pefomed.evaluate.run import evaluate_checkpoint, majority_baseline

    checkpoint = latest_checkpoint(cfg.train.output_dir)
    out = Path(cfg.train.output_dir) / "eval"
    model = evaluate_checkpoint(cfg, checkpoint, split="test", out_dir=out / "model")
    swapped = evaluate_checkpoint(cfg, checkpoint, split="test", out_dir=out / "swapped", swap_images=True)
    majority = majority_baseline(*vqa_train_and_test(cfg))
    total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu

    rows = [("trained model", model), ("same model, swapped images", swapped), ("majority answer", majority)]
    print(f"\n{cfg.model.llm} on the synthetic {cfg.data.synthetic_family} family: held-out split "
          f"({model.get('n', '?')} questions), exact-match accuracy")
    print(f"{'':30s} {'closed':>8s} {'open':>8s} {'overall':>8s}")
    for name, m in rows:
        print(f"{name:30s} {m['closed']:8.3f} {m['open']:8.3f} {m['overall']:8.3f}")
    shown = examples(out / "model" / "predictions.jsonl")
    print("\nreplies of the trained model:")
    for e in shown:
        print(f"  {Path(e['image']).name}: {e['question']!r} -> {e['reply'].strip()!r} (reference {e['answer']!r})")
    print(f"\ntraining: {train_wall:.0f} s wall, {train_cpu:.0f} s CPU; whole demo: {total_wall:.0f} s wall, "
          f"{total_cpu:.0f} s CPU; details in {out}")
    print(f"ask it yourself: pefomed ask --checkpoint {cfg.train.output_dir} --image {shown[0]['image']} "
          f"--question {shown[0]['question']!r}")
    summary = {name: m for name, m in rows} | {
        "family": cfg.data.synthetic_family,
        "llm": cfg.model.llm,
        "examples": shown,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "total_wall_s": total_wall,
        "total_cpu_s": total_cpu,
        "machine": machine(),
        "command": " ".join(["pefomed", "demo", "--config", args.config,
                             *(["--family", args.family] if args.family else []), *args.overrides]),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
