"""Training entry point: `torchrun --nproc_per_node=N train/run.py --config X [key=value ...]`.

The same as `pefomed train`. Thin on purpose: parse, build, train; the logic lives in
`pefomed.engine`. It also runs under the `deepspeed` launcher
(`deepspeed --num_gpus N train/run.py --config X train.strategy=deepspeed`), which passes
`--local_rank` besides the environment variables torchrun sets; the rank comes from LOCAL_RANK.
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
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    train_from_config(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
