"""Surface-distance metrics of one binary object pair, built on MONAI's surface utilities.

Two conventions are in use and they give different numbers, so each metric is named by what it computes:

- medpy's (``medpy.metric.binary``), used by the published semi-supervised ACDC tables: :func:`hd95` is the
  95th percentile of the *union* of both directed surface-distance sets and :func:`asd` is the mean distance from
  the *prediction's* surface to the reference's surface (one direction only).
- MONAI's: :func:`hd95_max_directed` is ``HausdorffDistanceMetric(percentile=95)`` (the larger of the two directed
  95th percentiles) and :func:`asd_symmetric` is ``SurfaceDistanceMetric(symmetric=True)`` (the mean of the union of
  both directed sets; note that medpy's ``assd`` instead averages the two directed means).

The surface of an object is the object XOR its binary erosion with the connectivity-1 structuring element, with
everything outside the image counted as background (so an object touching the image border has a surface there);
this is what medpy and ``monai.metrics.utils.get_mask_edges`` both compute. Distances are Euclidean between voxel
centres, in voxels (spacing 1 on every axis) or in the units of ``spacing`` (usually mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from monai.metrics.utils import get_mask_edges, get_surface_distance
from monai.transforms.utils import generate_spatial_bounding_box

__all__ = [
    "DirectedSurfaceDistances",
    "crop_to_union",
    "object_surfaces",
    "surface_distances",
    "hd95",
    "asd",
    "hd95_max_directed",
    "asd_symmetric",
]


class DirectedSurfaceDistances(NamedTuple):
    """The two directed surface-distance sets of a (prediction, reference) pair.

    ``pred_to_ref[i]`` is the distance from the i-th surface voxel of the prediction to the nearest surface voxel of
    the reference; ``ref_to_pred`` is the same the other way round.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray


def crop_to_union(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop two boolean masks of the same shape to the bounding box of their union plus ``margin`` voxels.

    The box is clipped at the image border. Overlap counts and surface distances are the same on the crop as on the
    whole image, and computing them on the crop is what makes per-volume evaluation fast (MONAI's own
    ``get_mask_edges(crop=True)`` crops with a transform pipeline that costs more than the metrics themselves).
    """
    start, end = generate_spatial_bounding_box((pred | ref)[None], margin=margin, allow_smaller=True)
    box = tuple(slice(lo, hi) for lo, hi in zip(start, end))
    return pred[box], ref[box]


def object_surfaces(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surface voxels of two boolean masks of the same shape, on the crop to their union bounding box.

    ``get_mask_edges`` erodes with scipy's default connectivity-1 structure and ``border_value=0``, so voxels outside
    the array count as background, which is also what medpy does: the surface is medpy's, including where an object
    touches the image border (or the crop's border, beyond which both masks are background anyway).
    """
    return get_mask_edges(*crop_to_union(pred, ref), crop=False)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> DirectedSurfaceDistances:
    """Both directed surface-distance sets of two non-empty boolean masks.

    Args:
        pred: predicted object, boolean array of any spatial dimension.
        ref: reference object, same shape as ``pred``.
        spacing: size of a voxel along each axis (e.g. mm); ``None`` measures in voxels.

    Raises:
        ValueError: when either mask is empty (a surface distance to nothing is undefined; callers apply their own
            empty rule, see :data:`vessa_components.metrics.volume.EMPTY_RULE`).
    """
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need a non-empty prediction and a non-empty reference.")
    pred_edges, ref_edges = object_surfaces(pred, ref)
    return DirectedSurfaceDistances(
        pred_to_ref=np.asarray(get_surface_distance(pred_edges, ref_edges, spacing=spacing), dtype=np.float64),
        ref_to_pred=np.asarray(get_surface_distance(ref_edges, pred_edges, spacing=spacing), dtype=np.float64),
    )


def hd95(distances: DirectedSurfaceDistances) -> float:
    """medpy's ``hd95``: the 95th percentile (linear interpolation) of the union of both directed distance sets."""
    return float(np.percentile(np.hstack(distances), 95))


def asd(distances: DirectedSurfaceDistances) -> float:
    """medpy's ``asd``: the mean distance from the prediction's surface voxels to the reference's surface."""
    return float(distances.pred_to_ref.mean())


def hd95_max_directed(distances: DirectedSurfaceDistances) -> float:
    """MONAI's ``HausdorffDistanceMetric(percentile=95)``: the larger of the two directed 95th percentiles."""
    return float(max(np.percentile(distances.pred_to_ref, 95), np.percentile(distances.ref_to_pred, 95)))


def asd_symmetric(distances: DirectedSurfaceDistances) -> float:
    """MONAI's ``SurfaceDistanceMetric(symmetric=True)``: the mean of the union of both directed distance sets."""
    return float(np.hstack(distances).mean())
