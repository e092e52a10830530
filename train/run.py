"""Training entry point: `torchrun --nproc_per_node=N train/run.py --config X [key=value ...]`.

Thin on purpose: parse, build, train. The logic lives in `engine/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/run.py` / torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import load_config  # noqa: E402
from engine.session import train_from_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5")
    args = parser.parse_args(argv)
    train_from_config(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
