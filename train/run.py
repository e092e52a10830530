"""Training entry point: `torchrun --nproc_per_node=N train/run.py --config X [key=value ...]`.

The same as `pefomed train`. Thin on purpose: parse, build, train; the logic lives in
`pefomed.engine`.
"""

from __future__ import annotations

import argparse
import sys

from pefomed.engine.config import load_config
from pefomed.engine.session import train_from_config
from pefomed.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pefomed train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-5")
    args = parser.parse_args(argv)
    train_from_config(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
