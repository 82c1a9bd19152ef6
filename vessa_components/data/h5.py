"""Reading the SSL4MIS-style HDF5 files (one slice or one volume per file, datasets ``image`` and ``label``)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from .errors import DataError

__all__ = ["read_h5", "LoadH5", "LoadH5d"]


def read_h5(path: str | os.PathLike, dataset: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one dataset of an HDF5 file with its attributes.

    Returns:
        the array and a dict of the file's attributes (``spacing`` in mm when the writer stored it).

    Raises:
        DataError: the file is missing, not HDF5, truncated, or has no such dataset.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise DataError(path, f"no dataset '{dataset}' (has: {sorted(f.keys())})")
            array = f[dataset][()]
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DataError(path, f"unreadable HDF5 file (corrupt or truncated?): {e}") from e
    return array, attrs


class LoadH5(Transform):
    """Load one dataset of an SSL4MIS-style HDF5 file as a :class:`monai.data.MetaTensor` (no channel dimension).

    Args:
        dataset: name of the HDF5 dataset to read (``image`` or ``label``).
        dtype: numpy dtype to cast to (``None`` keeps the stored one).
    """

    def __init__(self, dataset: str = "image", dtype: Any = np.float32) -> None:
        self.dataset = dataset
        self.dtype = dtype

    def __call__(self, filename: str | os.PathLike) -> MetaTensor:
        array, attrs = read_h5(filename, self.dataset)
        if self.dtype is not None:
            array = array.astype(self.dtype, copy=False)
        # voxel size in mm when the writer stored it (our converters do; the SSL4MIS release does not)
        spacing = [float(v) for v in np.atleast_1d(attrs.get("spacing", np.ones(array.ndim)))]
        if len(spacing) != array.ndim:
            raise DataError(filename, f"'spacing' attribute {spacing} does not match the {array.ndim}-D '{self.dataset}'")
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        meta = {"filename_or_obj": os.fspath(filename), "spatial_shape": np.asarray(array.shape)}
        return MetaTensor(array, affine=affine, meta=meta)


class LoadH5d(MapTransform):
    """Dictionary form of :class:`LoadH5`: each key holds a file path and is replaced by the dataset of the same name.

    Args:
        keys: keys to load, e.g. ``["image", "label"]``.
        datasets: HDF5 dataset name per key (default: the key itself).
        dtypes: numpy dtype per key, or one for all keys (labels are cast later, e.g. by ``EnsureTyped``).
        check_same_shape: require every loaded key to have the same shape (image/label pairs).
        allow_missing_keys: skip keys absent from the data (unlabelled samples have no ``label``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        datasets: Sequence[str] | str | None = None,
        dtypes: Sequence[Any] | Any = np.float32,
        check_same_shape: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        names = list(self.keys) if datasets is None else ([datasets] if isinstance(datasets, str) else list(datasets))
        if len(names) != len(self.keys):
            raise ValueError(f"LoadH5d: {len(self.keys)} keys but {len(names)} dataset names")
        dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes] * len(self.keys)
        self.loaders = {k: LoadH5(n, t) for k, n, t in zip(self.keys, names, dtypes)}
        self.check_same_shape = check_same_shape

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shapes: dict[Hashable, tuple[int, ...]] = {}
        for key in self.key_iterator(d):
            path = d[key]
            d[key] = self.loaders[key](path)
            shapes[key] = tuple(d[key].shape)
        if self.check_same_shape and len(set(shapes.values())) > 1:
            path = next(iter(d[k].meta["filename_or_obj"] for k in shapes))
            raise DataError(path, f"image/label shape mismatch: {shapes}")
        return d
