"""Evaluate a folder of NIfTI predictions against a folder of NIfTI labels, matched by file name.

Every input is read and checked (and scored) before anything is written, so a bad file stops the run with a
:class:`~vessa_components.data.errors.DataError` that names it and leaves no partial report behind.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from vessa_components.data.acdc import ACDC_CLASS_NAMES
from vessa_components.data.errors import DataError
from vessa_components.metrics.volume import VolumeResult, check_label_map, compute_volume_metrics
from vessa_components.utils.progress import progress_bar

__all__ = ["NIFTI_SUFFIXES", "find_nifti_files", "match_prediction_label_files", "load_label_map", "evaluate_folders"]

#: file-name endings read as NIfTI; a volume's name is its file name without them
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def find_nifti_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Volume name -> path of every NIfTI file directly in ``folder``, sorted by name.

    Raises:
        DataError: when ``folder`` is not a folder, holds no NIfTI file, or holds two files of the same volume
            (``x.nii`` and ``x.nii.gz``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder.")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[: -len(suffix)]
        if name in files:
            raise DataError(path, f"a second file of volume '{name}' (the other is {files[name].name}).")
        files[name] = path
    if not files:
        raise DataError(folder, f"no NIfTI files ({', '.join(NIFTI_SUFFIXES)}) in this folder.")
    return files


def match_prediction_label_files(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike
) -> list[tuple[str, Path, Path]]:
    """``(volume name, prediction path, label path)`` for every volume, matched by file name without extension.

    Raises:
        DataError: naming the first prediction without a label file, or else the first label without a prediction
            (and how many more there are).
    """
    preds, labels = find_nifti_files(pred_dir), find_nifti_files(label_dir)
    for unmatched, other_kind, other_dir in (
        ([preds[n] for n in preds if n not in labels], "label", label_dir),
        ([labels[n] for n in labels if n not in preds], "prediction", pred_dir),
    ):
        if unmatched:
            more = f" ({len(unmatched) - 1} more files lack one too)" if len(unmatched) > 1 else ""
            raise DataError(unmatched[0], f"no {other_kind} file of the same name in {other_dir}{more}.")
    return [(name, preds[name], labels[name]) for name in preds]


def load_label_map(path: str | os.PathLike, num_classes: int) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a 2D or 3D NIfTI label map and its voxel spacing (the header's zooms, mm), checking its values.

    Raises:
        DataError: when the file cannot be read (e.g. truncated), is not 2D/3D, or holds values outside
            ``0..num_classes`` or non-integer values.
    """
    try:
        image = nib.load(path)
        label_map = np.asanyarray(image.dataobj)
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError) as error:
        raise DataError(path, f"cannot be read as NIfTI ({type(error).__name__}: {error}).") from error
    if label_map.ndim not in (2, 3):
        raise DataError(path, f"expected a 2D or 3D label map, got shape {label_map.shape}.")
    try:
        check_label_map(label_map, num_classes)
    except ValueError as error:
        raise DataError(path, str(error)) from error
    spacing = tuple(float(z) for z in image.header.get_zooms()[: label_map.ndim])
    return label_map, spacing


def evaluate_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    class_names: Sequence[str] = ACDC_CLASS_NAMES,
    progress: bool | None = None,
) -> dict[str, VolumeResult]:
    """Score every prediction in ``pred_dir`` against the label of the same file name in ``label_dir``.

    Distances are in voxels and, from the label's header spacing, in mm (see
    :func:`~vessa_components.metrics.volume.compute_volume_metrics`). Nothing is written; pass the result to
    :func:`~vessa_components.metrics.report.write_report`.

    Args:
        pred_dir: folder of predicted label maps (``*.nii.gz`` / ``*.nii``).
        label_dir: folder of reference label maps with the same file names.
        class_names: names of the label values ``0..C`` (index 0 is the background).
        progress: show a progress bar over the volumes (``None``: when stderr is a terminal).

    Returns:
        volume name -> per-class metrics, in file-name order.

    Raises:
        DataError: naming the file, for unmatched files, unreadable files, label values outside ``0..C``, and a
            prediction whose shape or spacing differs from its label's.
        ValueError: when ``class_names`` has fewer than two names.
    """
    if len(class_names) < 2:
        raise ValueError(f"class_names must name the background and at least one class, got {list(class_names)}.")
    num_classes = len(class_names) - 1
    results: dict[str, VolumeResult] = {}
    pairs = match_prediction_label_files(pred_dir, label_dir)
    for name, pred_path, label_path in progress_bar(pairs, progress, desc="scoring volumes", unit="volume"):
        label, spacing = load_label_map(label_path, num_classes)
        pred, pred_spacing = load_label_map(pred_path, num_classes)
        if pred.shape != label.shape:
            raise DataError(pred_path, f"shape {pred.shape} differs from its label {label_path}'s {label.shape}.")
        if not np.allclose(pred_spacing, spacing, rtol=1e-3):
            raise DataError(pred_path, f"voxel spacing {pred_spacing} differs from its label {label_path}'s {spacing}.")
        results[name] = compute_volume_metrics(pred, label, class_names, spacing=spacing, name=name)
    return results
