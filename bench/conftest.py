"""pytest-benchmark cases of the training step and the kernels (`pytest bench --benchmark-only`).

    pytest bench --benchmark-only --benchmark-autosave            # record a baseline (.benchmarks/)
    pytest bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%
    pytest bench --benchmark-only --bench-size smoke              # tiny shapes: the harness runs (CI)

`--bench-size full` (the default) runs the shapes that matter: on the CPU, one step of the real
SmolLM2 (B=4, PeFoMed-like batch) ours and HF+PEFT; on CUDA, each seed's LLM at
`--bench-layers` decoder layers in bf16, and the kernels at the LLM's shapes. `smoke` runs
everything on tiny shapes on the CPU (kernels in the Triton interpreter) and times nothing that
means anything. Each case stores its configuration in `extra_info`, so saved runs compare like
with like.
"""

from __future__ import annotations

import os

import pytest
import torch

# The Triton interpreter must be chosen before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    group = parser.getgroup("pefomed benchmarks")
    group.addoption("--bench-size", choices=("full", "smoke"), default="full",
                    help="full: the real shapes; smoke: tiny shapes that only prove the cases run")  # fmt: skip
    group.addoption("--bench-layers", type=int, default=4, help="decoder layers of the 7-8B models on CUDA")


@pytest.fixture(scope="session")
def bench_size(request) -> str:
    return request.config.getoption("--bench-size")


@pytest.fixture(scope="session")
def bench_layers(request) -> int:
    return request.config.getoption("--bench-layers")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-models")


@pytest.fixture(scope="session")
def synchronized(device):
    """Wraps a callable so that it returns only when the device has finished (pytest-benchmark
    reads a wall clock)."""

    def wrap(fn):
        if device.type != "cuda":
            return fn

        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return out

        return run

    return wrap
