"""Shared fixtures: where the real data lives (outside the repo, never copied into it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path:
    """The shared data folder: ``$VESSA_SHARED_DATA`` or the first ``shared/data`` beside the repo or one of its parents."""
    env = os.environ.get("VESSA_SHARED_DATA")
    if env:
        return Path(env)
    for parent in REPO_ROOT.parents:
        candidate = parent / "shared" / "data"
        if (candidate / "acdc_ssl4mis").is_dir():
            return candidate
    raise RuntimeError(
        "The real test data (shared/data/acdc_ssl4mis, shared/data/abdomen_ct_example) was not found beside the "
        "repository or its parents; set VESSA_SHARED_DATA to the folder that holds them."
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _find_shared_data()


@pytest.fixture(scope="session")
def acdc_root(shared_data: Path) -> Path:
    """Real ACDC in the SSL4MIS layout (read-only)."""
    return shared_data / "acdc_ssl4mis"


@pytest.fixture(scope="session")
def abdomen_ct_dir(shared_data: Path) -> Path:
    """One real abdominal CT with TotalSegmentator labels (read-only)."""
    return shared_data / "abdomen_ct_example"
