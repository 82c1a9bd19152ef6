"""Per-volume, per-class segmentation metrics of integer label maps: Dice, Jaccard, HD95 and ASD.

A volume is scored as a whole (slice-wise predictions are stacked back into the volume first), each foreground
class ``1..C`` separately. Distances are reported in voxels (spacing 1 on every axis: the convention of the
published ACDC tables) and, when the voxel spacing is given, also in its units (mm) under a ``_mm`` suffix.
See :mod:`vessa_components.metrics.surface` for which definition each distance name stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.utils import convert_to_numpy

from vessa_components.metrics.surface import (
    DirectedSurfaceDistances,
    asd,
    asd_symmetric,
    crop_to_union,
    hd95,
    hd95_max_directed,
    surface_distances,
)

__all__ = [
    "EMPTY_RULE",
    "OVERLAP_METRICS",
    "SURFACE_METRICS",
    "MM_SUFFIX",
    "VolumeResult",
    "metric_unit",
    "image_diagonal",
    "check_label_map",
    "compute_volume_metrics",
]

#: how a class that is empty in the prediction and/or the reference is scored (included in every report)
EMPTY_RULE = (
    "Per volume and class: if exactly one of prediction and reference is empty, Dice = 0, Jaccard = 0 and every "
    "distance (hd95, asd, hd95_max_directed, asd_symmetric) = the image diagonal, i.e. sqrt(sum((n_i * s_i)^2)) "
    "over the image size n_i and spacing s_i (s_i = 1 for the voxel metrics, the voxel spacing for the _mm metrics), "
    "never 0. If both are empty, Dice = 1, Jaccard = 1 and every distance = 0, and the case is flagged "
    "(prediction_empty = reference_empty = true)."
)

#: overlap metrics, as fractions in [0, 1]
OVERLAP_METRICS: tuple[str, ...] = ("dice", "jaccard")

#: surface-distance metrics by name (see :mod:`vessa_components.metrics.surface` for their definitions)
SURFACE_METRICS: dict[str, Callable[[DirectedSurfaceDistances], float]] = {
    "hd95": hd95,
    "asd": asd,
    "hd95_max_directed": hd95_max_directed,
    "asd_symmetric": asd_symmetric,
}

#: suffix of the surface-distance metrics measured in the units of the voxel spacing (mm)
MM_SUFFIX = "_mm"

#: one volume's metrics: class name -> metric name -> value, plus the ``prediction_empty``/``reference_empty`` flags
VolumeResult = dict[str, dict[str, float | bool]]


def metric_unit(metric: str) -> str:
    """The unit of a metric name produced by :func:`compute_volume_metrics`, in words."""
    if metric in OVERLAP_METRICS:
        return "fraction in [0, 1]"
    if metric.endswith(MM_SUFFIX) and metric[: -len(MM_SUFFIX)] in SURFACE_METRICS:
        return "mm (the volume's voxel spacing)"
    if metric in SURFACE_METRICS:
        return "voxels (spacing 1 on every axis)"
    raise ValueError(f"unknown metric '{metric}'.")


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the image's diagonal, ``sqrt(sum((n_i * s_i)^2))``: an upper bound of any surface distance in it."""
    extent = np.asarray(shape, dtype=np.float64) * (1.0 if spacing is None else np.asarray(spacing, dtype=np.float64))
    return float(np.linalg.norm(extent))


def check_label_map(label_map: np.ndarray, num_classes: int) -> None:
    """Raise ``ValueError`` unless every value of ``label_map`` is an integer in ``0..num_classes``."""
    if label_map.size == 0:
        raise ValueError("the label map is empty (no voxels).")
    if not (np.issubdtype(label_map.dtype, np.integer) or np.issubdtype(label_map.dtype, np.bool_)):
        if not np.all(np.isfinite(label_map)) or not np.array_equal(label_map, np.round(label_map)):
            raise ValueError("the label map holds values that are not integers (is it a probability map?).")
    low, high = label_map.min(), label_map.max()
    if low < 0 or high > num_classes:
        values = np.unique(label_map)
        outside = values[(values < 0) | (values > num_classes)]
        raise ValueError(f"label values {outside.tolist()} are outside 0..{num_classes}.")


def _class_metrics(
    pred: np.ndarray, ref: np.ndarray, spacings: Mapping[str, tuple[float, ...] | None]
) -> dict[str, float | bool]:
    """All metrics of one class from its boolean prediction and reference masks (see :data:`EMPTY_RULE`).

    ``spacings`` maps a metric-name suffix to the spacing its distances are measured with.
    """
    pred_empty, ref_empty = not pred.any(), not ref.any()
    metrics: dict[str, float | bool] = {}
    if pred_empty or ref_empty:
        overlap = 1.0 if pred_empty and ref_empty else 0.0
        metrics.update(dict.fromkeys(OVERLAP_METRICS, overlap))
        for suffix, spacing in spacings.items():
            distance = 0.0 if pred_empty and ref_empty else image_diagonal(pred.shape, spacing)
            metrics.update({f"{name}{suffix}": distance for name in SURFACE_METRICS})
    else:
        pred, ref = crop_to_union(pred, ref)
        pred_t, ref_t = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
        metrics["dice"] = float(compute_dice(pred_t, ref_t, ignore_empty=False)[0, 0])
        metrics["jaccard"] = float(compute_iou(pred_t, ref_t, ignore_empty=False)[0, 0])
        for suffix, spacing in spacings.items():
            distances = surface_distances(pred, ref, spacing)
            metrics.update({f"{name}{suffix}": fn(distances) for name, fn in SURFACE_METRICS.items()})
    metrics["prediction_empty"] = pred_empty
    metrics["reference_empty"] = ref_empty
    return metrics


def compute_volume_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    name: str = "volume",
) -> VolumeResult:
    """Dice, Jaccard and surface distances of each foreground class of one volume.

    Args:
        pred: predicted label map (integers ``0..C``), spatial dimensions only, e.g. ``[S, H, W]``.
        label: reference label map, same shape.
        class_names: names of the label values ``0..C``; index 0 is the background and is not scored.
        spacing: voxel size along each axis of ``pred`` (mm); when given, every distance is also reported in mm
            under the same name with a ``_mm`` suffix.
        name: the volume's name, used in error messages.

    Returns:
        ``{class_name: {"dice", "jaccard", "hd95", "asd", "hd95_max_directed", "asd_symmetric", [the four
        distances + "_mm"], "prediction_empty", "reference_empty"}}`` for the foreground classes, in label order.
        Overlaps are fractions in [0, 1]; empty classes follow :data:`EMPTY_RULE`.

    Raises:
        ValueError: on a shape mismatch, label values outside ``0..C`` or a spacing that does not fit the volume.
    """
    pred, label = convert_to_numpy(pred), convert_to_numpy(label)
    if pred.shape != label.shape:
        raise ValueError(f"{name}: prediction shape {pred.shape} differs from label shape {label.shape}.")
    if len(class_names) < 2:
        raise ValueError(f"class_names must name the background and at least one class, got {list(class_names)}.")
    num_classes = len(class_names) - 1
    for what, label_map in (("prediction", pred), ("label", label)):
        try:
            check_label_map(label_map, num_classes)
        except ValueError as error:
            raise ValueError(f"{name}: {what}: {error}") from error
    spacings: dict[str, tuple[float, ...] | None] = {"": None}
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != pred.ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"{name}: spacing {spacing} must be {pred.ndim} positive numbers, one per axis.")
        spacings[MM_SUFFIX] = spacing
    return {
        class_name: _class_metrics(pred == value, label == value, spacings)
        for value, class_name in enumerate(class_names)
        if value > 0
    }
