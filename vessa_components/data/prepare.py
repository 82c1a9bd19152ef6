"""Turn whatever layout a bundle is pointed at into the slice layout its training reads."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..utils.io import write_json
from .abdomenct import (
    ABDOMENCT_HU_WINDOW,
    ABDOMENCT_IMAGE_SUFFIX,
    ABDOMENCT_LABEL_SUFFIX,
    convert_abdomenct_to_slices,
    find_abdomenct_cases,
    resolve_label_map,
)
from .acdc_raw import convert_acdc_raw_to_ssl4mis
from .demo import SYNTHETIC_MARKER, make_demo_acdc
from .demo_abdomenct import make_demo_abdomenct
from .errors import DataError

__all__ = ["DATA_LAYOUTS", "ABDOMENCT_MIN_CASES", "ABDOMENCT_SMALL_SET_PARTS", "abdomenct_folders", "prepare_dataset"]

#: ``ssl4mis``: the SSL4MIS processed layout, used as is; ``acdc_raw``: the ACDC challenge download, converted once;
#: ``demo``: a synthetic ACDC-like set generated in ``dataset_dir`` when absent (no download needed), then converted;
#: ``abdomenct``: CT volumes with masks (AbdomenCT-1K naming by default), converted once to axial slices;
#: ``abdomenct_demo``: a synthetic abdominal CT set generated in ``dataset_dir`` when absent, then converted.
DATA_LAYOUTS = ("ssl4mis", "acdc_raw", "demo", "abdomenct", "abdomenct_demo")

#: a CT data set needs this many cases for one validation, one labelled and one unlabelled case
ABDOMENCT_MIN_CASES = 3
#: with fewer cases, every case is cut into axial parts so that there are at least this many (pseudo-)cases:
#: one validation (20 %), one labelled (5 %, rounded up) and three unlabelled
ABDOMENCT_SMALL_SET_PARTS = 5
#: written next to a conversion: the settings it was made with, so a change of settings converts again
_SETTINGS_FILE = "prepared.json"


def _is_converted(root: Path) -> bool:
    # the converter writes the list files last: their presence means a complete conversion
    return (root / "train_slices.list").is_file() and (root / "val.list").is_file()


def abdomenct_folders(dataset_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The image and mask folders of a CT data set: ``images/`` and ``labels/`` (AbdomenCT-1K), ``imagesTr/`` and
    ``labelsTr/`` (nnU-Net / Medical Segmentation Decathlon) when present, else ``dataset_dir`` for both."""
    root = Path(dataset_dir)
    for images, labels in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / images).is_dir() and (root / labels).is_dir():
            return root / images, root / labels
    return root, root


def _read_settings(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / _SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _prepare_abdomenct(
    dataset_dir: Path,
    out: Path,
    seed: int,
    label_map: str | Mapping[Any, Any] | None,
    hu_window: Sequence[float],
    image_suffix: str,
    label_suffix: str,
) -> None:
    """Convert a CT data set to ``out`` unless a conversion with the same settings is already there."""
    if not dataset_dir.is_dir():
        raise DataError(dataset_dir, "dataset_dir does not exist")
    mapping = resolve_label_map(label_map)  # unknown preset or class names fail here, before any file is read
    image_dir, label_dir = abdomenct_folders(dataset_dir)
    n_cases = len(find_abdomenct_cases(image_dir, label_dir, image_suffix=image_suffix, label_suffix=label_suffix))
    axial_parts = 1
    if n_cases < ABDOMENCT_MIN_CASES:
        axial_parts = math.ceil(ABDOMENCT_SMALL_SET_PARTS / n_cases)
        warnings.warn(
            f"{image_dir}: only {n_cases} case(s); each is cut into {axial_parts} contiguous axial parts "
            "'<case>_part<k>' that act as cases, so labelled, unlabelled and validation sets are still disjoint. "
            "They come from the same patient(s): use this to check the pipeline, not to measure accuracy.",
            stacklevel=3,
        )
    settings = {
        "image_dir": str(image_dir.resolve()),
        "label_dir": str(label_dir.resolve()),
        "image_suffix": image_suffix,
        "label_suffix": label_suffix,
        "label_map": None if mapping is None else {str(k): v for k, v in sorted(mapping.items())},
        "hu_window": [float(v) for v in hu_window],
        "axial_parts": axial_parts,
        "seed": seed,
    }
    if _is_converted(out) and _read_settings(out) == settings:
        return
    if out.exists():
        if not (out / _SETTINGS_FILE).is_file() and any(out.iterdir()):
            raise DataError(out, f"exists, is not empty and holds no {_SETTINGS_FILE}: not a conversion to replace")
        warnings.warn(f"{out}: converted with other settings (or incompletely); converting again", stacklevel=3)
        shutil.rmtree(out)
    convert_abdomenct_to_slices(
        image_dir,
        out,
        label_dir=label_dir,
        label_map=mapping,
        hu_window=hu_window,
        seed=seed,
        image_suffix=image_suffix,
        label_suffix=label_suffix,
        axial_parts=axial_parts,
    )
    write_json(out / _SETTINGS_FILE, settings)


def prepare_dataset(
    dataset_dir: str | os.PathLike,
    layout: str,
    work_dir: str | os.PathLike,
    seed: int = 0,
    label_map: str | Mapping[Any, Any] | None = None,
    hu_window: Sequence[float] = ABDOMENCT_HU_WINDOW,
    image_suffix: str = ABDOMENCT_IMAGE_SUFFIX,
    label_suffix: str = ABDOMENCT_LABEL_SUFFIX,
) -> str:
    """Return the root of the slice layout for ``dataset_dir``, converting (and for ``demo`` generating) it if needed.

    Conversions go to ``work_dir/<layout>_ssl4mis`` and are reused by later runs. In distributed runs rank 0 does the
    work while the other ranks wait.

    CT layouts (``abdomenct``, ``abdomenct_demo``): the volumes are found by :func:`abdomenct_folders` and
    :func:`~vessa_components.data.abdomenct.find_abdomenct_cases`, 20 % of the cases (rounded up) are held out for
    validation, and the settings are stored beside the conversion, which is redone when they change. A set of fewer
    than :data:`ABDOMENCT_MIN_CASES` cases is cut into axial parts (see
    :func:`~vessa_components.data.abdomenct.convert_abdomenct_to_slices`), with a warning.

    Args:
        dataset_dir: the data set as the user has it.
        layout: one of :data:`DATA_LAYOUTS`.
        work_dir: folder for converted data (e.g. ``<output_dir>/prepared_data``).
        seed: seed of the demo data and of the validation draw of converted sets without a standard split.
        label_map: CT only: ``{source_id: AbdomenCT-1K id or class name}`` or a preset name (``totalsegmentator``)
            for masks in another label convention; ``None``: masks already use the AbdomenCT-1K ids.
        hu_window: CT only: Hounsfield window ``(low, high)`` mapped to [0, 1].
        image_suffix: CT only: how image file names end (``<case><image_suffix>``).
        label_suffix: CT only: how mask file names end.
    """
    if layout not in DATA_LAYOUTS:
        raise ValueError(f"unknown data_layout '{layout}'; choose one of {DATA_LAYOUTS}")
    dataset_dir = Path(dataset_dir)
    if layout == "ssl4mis":
        if not dataset_dir.is_dir():
            raise DataError(dataset_dir, "dataset_dir does not exist")
        return str(dataset_dir)
    if layout == "abdomenct_demo" and label_map is not None:
        raise ValueError(
            f"label_map={label_map!r} with data_layout 'abdomenct_demo': the synthetic set already uses the "
            "AbdomenCT-1K ids; label_map is for data_layout 'abdomenct'"
        )
    out = Path(work_dir) / f"{layout}_ssl4mis"
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        if layout in ("abdomenct", "abdomenct_demo"):
            if layout == "abdomenct_demo" and not (dataset_dir / SYNTHETIC_MARKER).is_file():
                make_demo_abdomenct(dataset_dir, seed=seed)
            _prepare_abdomenct(dataset_dir, out, seed, label_map, hu_window, image_suffix, label_suffix)
        else:
            if layout == "demo" and not (dataset_dir / SYNTHETIC_MARKER).is_file():
                make_demo_acdc(dataset_dir, seed=seed)
            if layout == "acdc_raw" and not dataset_dir.is_dir():
                raise DataError(dataset_dir, "dataset_dir does not exist")
            if not _is_converted(out):
                convert_acdc_raw_to_ssl4mis(dataset_dir, out, seed=seed, overwrite=True)
    if distributed:
        dist.barrier()
    return str(out)
