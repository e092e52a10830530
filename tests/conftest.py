import os
import tempfile

import pytest
import torch

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
