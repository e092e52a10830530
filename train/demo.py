"""The embedded demo: synthetic radiology data -> LoRA + projection training -> evaluation.

`pefomed demo` (or `python -m pefomed.train.demo --config configs/demo.yaml`, what `make demo`
runs). It generates the synthetic dataset, trains the tiny ViT + LLaMA on it, and evaluates the
held-out split three ways: the trained model, the same model with the images swapped across questions, and the
majority-answer baseline. There are no pretrained weights offline, so the base model starts
from random weights; point `model.llm` and `model.vision_checkpoint` at real checkpoints to run
the same pipeline on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pefomed.engine.config import load_config
from pefomed.engine.data.sources import load_samples
from pefomed.engine.session import train_from_config
from pefomed.errors import run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    started = time.perf_counter()
    train_from_config(cfg)
    trained_s = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under torchrun, rank 0 alone evaluates and reports

    from pefomed.engine.checkpoint import latest_checkpoint
    from pefomed.evaluate.run import evaluate_checkpoint, majority_baseline

    checkpoint = latest_checkpoint(cfg.train.output_dir)
    out = Path(cfg.train.output_dir) / "eval"
    model = evaluate_checkpoint(cfg, checkpoint, split="test", out_dir=out / "model")
    swapped = evaluate_checkpoint(cfg, checkpoint, split="test", out_dir=out / "swapped", swap_images=True)
    test_specs = [s.__class__(**{**s.__dict__, "split": "test"}) for s in cfg.data.train]
    majority = majority_baseline(load_samples(cfg.data.train, cfg), load_samples(test_specs, cfg))
    total_s = time.perf_counter() - started

    rows = [("trained model", model), ("same model, swapped images", swapped), ("majority answer", majority)]
    print(f"\nheld-out split ({model.get('n', '?')} questions), exact-match accuracy:")
    print(f"{'':30s} {'closed':>8s} {'open':>8s} {'overall':>8s}")
    for name, m in rows:
        print(f"{name:30s} {m['closed']:8.3f} {m['open']:8.3f} {m['overall']:8.3f}")
    print(f"\ntraining {trained_s:.0f} s, total {total_s:.0f} s; details in {out}")
    summary = {name: m for name, m in rows} | {"train_seconds": trained_s, "total_seconds": total_s}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
