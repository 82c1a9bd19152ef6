"""Shared fixtures: where the real data lives (outside the repo, never copied into it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _local_origin() -> Path | None:
    """The folder of the ``origin`` remote when it is a local repository, else ``None``."""
    try:
        url = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "remote", "get-url", "origin"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(url.removeprefix("file://"))
    return path.resolve() if path.is_dir() else None


def _find_shared_data() -> Path:
    """``$VESSA_SHARED_DATA``, else the first ``shared/data`` beside this repository, the one it was cloned from, or
    one of their parents."""
    env = os.environ.get("VESSA_SHARED_DATA")
    if env:
        return Path(env)
    roots = [REPO_ROOT]
    origin = _local_origin()
    if origin is not None:  # a clean clone elsewhere finds the data beside the repository it was cloned from
        roots.append(origin)
    for root in roots:
        for parent in root.parents:
            candidate = parent / "shared" / "data"
            if (candidate / "acdc_ssl4mis").is_dir():
                return candidate
    raise RuntimeError(
        "The real test data (shared/data/acdc_ssl4mis, shared/data/abdomen_ct_example) was not found beside the "
        "repository, the repository it was cloned from, or their parents; set VESSA_SHARED_DATA to the folder that holds them."
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

