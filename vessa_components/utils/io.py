"""Crash-safe writers: every file is written under a temporary name in the same folder and renamed into place,
so an interrupted run never leaves a half-written file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "latest_checkpoint", "write_json", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    ``suffix`` defaults to the full suffix of ``path`` (e.g. ``.nii.gz``) so writers that pick a format from the
    file name (nibabel, SimpleITK, torch) keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and return the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def latest_checkpoint(ckpt_dir: str | os.PathLike, pattern: str = "checkpoint_iteration=*.pt") -> Path | None:
    """The checkpoint with the highest iteration in ``ckpt_dir`` (names as written by MONAI's ``CheckpointSaver``),
    or ``None`` when there is none, in which case training starts from scratch."""
    candidates = []
    for path in Path(ckpt_dir).glob(pattern):
        match = re.search(r"iteration=(\d+)", path.name)
        if match:
            candidates.append((int(match.group(1)), path))
    if not candidates:
        warnings.warn(f"{ckpt_dir}: no checkpoint to resume from; training starts from scratch")
        return None
    return max(candidates)[1]
