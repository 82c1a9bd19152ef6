"""Training on NIfTI volumes as well as on SSL4MIS HDF5 files: what a MONAI Label training request brings.

MONAI Label's bundle trainer sets ``train#dataset#data`` (and ``validate#dataset#data``) to the labelled image/label
pairs of its studies folder: NIfTI volumes, where the bundle's own data lists hold SSL4MIS HDF5 slices and volumes.
:class:`LoadH5OrNiftid` reads both into the same form (the (z, y, x) order of the SSL4MIS arrays, intensities in
[0, 1]) and :class:`RandSliced` draws one 2D slice of a volume for the 2D students, leaving 2D slices as they are.
:class:`CheckImageFiled` turns the inputs a server is sent (a missing file, a corrupt upload, an image of the wrong
dimension) into one clear error naming the file and the problem, before any reader sees them.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform, RandomizableTransform

from ..data.errors import DataError
from ..data.h5 import LoadH5

__all__ = ["NIFTI_SUFFIXES", "CheckImageFiled", "LoadH5OrNiftid", "RandSliced", "load_nifti_as_stack"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_nifti_as_stack(path: str | os.PathLike, scale: bool, dtype: Any = np.float32) -> MetaTensor:
    """A NIfTI volume as a :class:`MetaTensor` in the SSL4MIS order.

    The array is transposed from NIfTI's (x, y, z) to (z, y, x), as ``inference.json`` does, with a diagonal affine of
    the voxel sizes (mm) in that order, as :class:`~vessa_components.data.LoadH5` gives for HDF5 volumes.

    Args:
        path: ``.nii`` or ``.nii.gz`` file of a 3D volume.
        scale: min-max scale the intensities to [0, 1] over the volume (images; SSL4MIS stores them so).
        dtype: numpy dtype of the array.

    Raises:
        DataError: the file is missing, unreadable, or not 3D.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        img = nib.load(path)
        array = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # nibabel raises several types for truncated or foreign files
        raise DataError(path, f"unreadable NIfTI file (corrupt or truncated?): {e}") from e
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {array.shape}")
    array = np.ascontiguousarray(array.transpose(2, 1, 0))
    if scale:
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    spacing = [float(s) for s in img.header.get_zooms()[:3]][::-1]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(array, affine=affine, meta={"filename_or_obj": path, "spatial_shape": np.asarray(array.shape)})


class LoadH5OrNiftid(MapTransform):
    """Load each key's file by its suffix: SSL4MIS HDF5 (``.h5``, the dataset named as the key) or a NIfTI volume.

    Both give a :class:`MetaTensor` without channel dimension in the (z, y, x) order (2D for HDF5 slices). NIfTI images
    are min-max scaled per volume to [0, 1], as the SSL4MIS files are and as ``inference.json`` scales its input.

    Args:
        keys: keys holding file paths, e.g. ``["image", "label"]``.
        scale_keys: keys whose NIfTI volumes are intensity-scaled (the images; never the labels).
        allow_missing_keys: skip keys absent from the data (unlabelled samples have no ``label``).
    """

    def __init__(
        self, keys: KeysCollection, scale_keys: KeysCollection = ("image",), allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scale_keys = {scale_keys} if isinstance(scale_keys, str) else set(scale_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shapes = {}
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            if path.endswith(NIFTI_SUFFIXES):
                d[key] = load_nifti_as_stack(path, scale=key in self.scale_keys)
            elif path.endswith(".h5"):
                d[key] = LoadH5(str(key))(path)
            else:
                raise DataError(path, f"unsupported file type for '{key}' (expected .h5, .nii or .nii.gz)")
            shapes[key] = tuple(d[key].shape)
        if len(set(shapes.values())) > 1:
            raise DataError(str(next(iter(d[k] for k in shapes)).meta["filename_or_obj"]), f"shape mismatch: {shapes}")
        return d


class RandSliced(RandomizableTransform, MapTransform):
    """Draw one slice along the first spatial axis (the stack axis) of channel-first volumes, the same for all keys.

    Channel-first 2D slices (``[C, H, W]``) pass through unchanged, so one training pipeline takes both SSL4MIS slices
    and whole volumes (one random slice per visit, every slice equally likely).

    Args:
        keys: keys to slice together, e.g. ``["image", "label"]``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys or d[keys[0]].ndim != 4:
            return d
        depth = d[keys[0]].shape[1]
        index = int(self.R.randint(depth))
        for key in keys:
            if d[key].ndim != 4 or d[key].shape[1] != depth:
                raise ValueError(f"RandSliced: '{key}' has shape {tuple(d[key].shape)}, expected [C, {depth}, H, W]")
            d[key] = _take_slice(d[key], index)
        return d


def _take_slice(volume: torch.Tensor, index: int) -> torch.Tensor:
    """``volume[:, index]``; a :class:`MetaTensor` keeps its in-plane voxel sizes in a 2D affine."""
    if not isinstance(volume, MetaTensor):
        return volume[:, index]
    spacing = affine_to_spacing(volume.affine, r=3).tolist()
    affine = torch.diag(torch.tensor([*spacing[1:], 1.0], dtype=torch.float64))
    meta = {k: v for k, v in volume.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
    return MetaTensor(volume.as_tensor()[:, index].clone(), affine=affine, meta=meta)


class CheckImageFiled(MapTransform):
    """Check that each key holds the path of a readable image with ``spatial_dims`` spatial dimensions.

    NIfTI files are opened with nibabel (header and the last voxel, which reads a compressed file to its end, so a
    truncated upload is caught) without keeping the array; other paths must exist (the loader reads them).

    Args:
        keys: keys holding file paths (``image``).
        spatial_dims: spatial dimensions the network's pipeline expects (3 for a volume segmented slice by slice);
            a trailing axis of length 1 (a 4D NIfTI of one frame) counts as absent.
        allow_missing_keys: skip absent keys.

    Raises:
        DataError: naming the file and what is wrong with it.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                continue  # already loaded (an array), nothing to check here
            path = os.fspath(path)
            if not path or not os.path.exists(path):
                raise DataError(path or "''", f"'{key}': image file not found")
            if not path.endswith(NIFTI_SUFFIXES):
                continue
            try:
                img = nib.load(path)
                shape = tuple(img.shape)
                if len(shape) > self.spatial_dims and all(s == 1 for s in shape[self.spatial_dims :]):
                    shape = shape[: self.spatial_dims]
                if len(shape) == self.spatial_dims:
                    img.dataobj[(-1,) * len(img.shape)]
            except Exception as e:  # nibabel raises several types for corrupt, truncated or foreign files
                raise DataError(path, f"'{key}': not a readable NIfTI image (corrupt or truncated upload?): {e}") from e
            if len(shape) != self.spatial_dims:
                raise DataError(
                    path, f"'{key}': expected a {self.spatial_dims}D image, got shape {tuple(img.shape)} ({len(img.shape)}D)"
                )
        return d
