"""pefomed: parameter-efficient fine-tuning of vision-language models on medical images.

The repository's root folders install under this one name (`engine/` is `pefomed.engine`,
`kernels/` is `pefomed.kernels`, ...), so none of them shadows a PyPI package of the same
name. `pefomed.cli` is the `pefomed` command.
"""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _drop_the_checkout_root() -> None:
    # `python -m pefomed.<module>` started inside the checkout puts the checkout's root first on
    # sys.path, and there its `kernels/` and `evaluate/` folders would answer to `import kernels`
    # and `import evaluate` (bitsandbytes probes Hugging Face's `kernels` on import). Everything
    # in the root is reachable as pefomed.*, so the entry goes.
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").is_file():
        return  # an installed copy (site-packages), not a checkout
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]


_drop_the_checkout_root()
