"""MONAI-style datalists (``labeled`` / ``unlabeled`` / ``validation``) over the slice layout shared by ACDC and CT.

Layout (the SSL4MIS processed format, also written by ``tools/prepare_acdc.py`` and ``tools/prepare_abdomenct.py``)::

    ROOT/data/slices/<case>[_frameYY]_slice_K.h5   training slices (listed in ROOT/train_slices.list)
    ROOT/data/<case>[_frameYY].h5                  whole volumes (listed in ROOT/val.list, ROOT/test.list)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


from ..utils.io import write_json
from .errors import DataError
from .splits import select_labeled_patients

__all__ = ["case_of", "read_list_file", "make_slice_datalist", "write_datalist", "volume_datalist", "image_datalist"]

_SUFFIXES = (re.compile(r"_slice_\d+$"), re.compile(r"_frame\d+$"))


def case_of(name: str) -> str:
    """The patient / case id of a slice or volume name (``patient099_frame01_slice_3`` -> ``patient099``)."""
    for pattern in _SUFFIXES:
        name = pattern.sub("", name)
    return name


def read_list_file(path: str | os.PathLike) -> list[str]:
    """Names in a ``*.list`` file, one per line, without ``.h5``; an empty or missing file is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "list file not found")
    names = [line.strip().removesuffix(".h5") for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(path, "list file is empty")
    return names


def volume_datalist(root: str | os.PathLike, list_file: str | os.PathLike) -> list[dict[str, str]]:
    """One ``{"image", "label", "patient", "name"}`` entry per volume named in ``list_file``: a path relative to
    ``root`` (``val.list``) or to the working directory, or an absolute one."""
    root = Path(root)
    list_path = Path(list_file)
    if not list_path.is_absolute() and (root / list_path).is_file():
        list_path = root / list_path
    entries = []
    for name in read_list_file(list_path):
        path = root / "data" / f"{name}.h5"
        if not path.is_file():
            raise DataError(path, f"volume named in {list_path} not found")
        entries.append({"image": str(path), "label": str(path), "patient": case_of(name), "name": name})
    return entries


def make_slice_datalist(
    root: str | os.PathLike,
    labeled_cases: int | float | str | list[str] = 3,
    seed: int = 0,
    train_list: str = "train_slices.list",
    val_list: str = "val.list",
) -> dict[str, Any]:
    """Build the datalist of a data set in the slice layout.

    Args:
        root: data set root (holds ``data/`` and the list files).
        labeled_cases: which training patients are labelled; see :func:`vessa_components.data.parse_labeled_cases`.
        seed: seed for fraction-based splits.
        train_list: list file of training slices, relative to ``root``.
        val_list: list file of validation volumes, relative to ``root`` (or absolute).

    Returns:
        ``{"labeled": [...], "unlabeled": [...], "validation": [...], "labeled_patients": [...]}``; unlabelled
        entries carry no ``label`` key.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset_dir does not exist")
    train_path = root / train_list
    slice_names = read_list_file(train_path)
    patients = list(dict.fromkeys(case_of(n) for n in slice_names))
    labeled_patients, _ = select_labeled_patients(patients, labeled_cases, seed=seed, source=train_path)
    labeled_set = set(labeled_patients)
    labeled, unlabeled = [], []
    for name in slice_names:
        path = root / "data" / "slices" / f"{name}.h5"
        if not path.is_file():
            raise DataError(path, f"slice named in {train_path} not found")
        patient = case_of(name)
        if patient in labeled_set:
            labeled.append({"image": str(path), "label": str(path), "patient": patient, "name": name})
        else:
            unlabeled.append({"image": str(path), "patient": patient, "name": name})
    return {
        "labeled": labeled,
        "unlabeled": unlabeled,
        "validation": volume_datalist(root, val_list),
        "labeled_patients": labeled_patients,
    }


def image_datalist(
    folder: str | os.PathLike, pattern: str = "*.nii*", allow_empty: bool = False
) -> list[dict[str, str]]:
    """One ``{"image": path}`` entry per file in ``folder`` whose name matches the glob ``pattern``, sorted by name
    (the inputs of an inference run).

    Args:
        folder: folder of the inputs.
        pattern: glob pattern of their file names.
        allow_empty: return ``[]`` for a missing folder or no match (so a bundle's default config can be parsed and
            checked before any input exists) instead of raising.

    Raises:
        DataError: ``folder`` does not exist or no file in it matches ``pattern`` (unless ``allow_empty``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        if allow_empty:
            return []
        raise DataError(folder, "input folder not found")
    paths = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not paths and not allow_empty:
        raise DataError(folder, f"no input file matches '{pattern}' in this folder")
    return [{"image": str(p)} for p in paths]


def write_datalist(datalist: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write a datalist as JSON (atomically)."""
    return write_json(out, datalist)
