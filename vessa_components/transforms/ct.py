"""Label remapping between segmentation label conventions (e.g. TotalSegmentator ids -> AbdomenCT-1K ids).

MONAI's :class:`monai.transforms.MapLabelValue` keeps every value it is not told about, and loops once per mapped
value; remapping another convention to a smaller class set needs the opposite default (every unmapped id becomes
background), which a lookup table gives in one vectorised pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.config.type_definitions import DtypeLike, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from ..data.errors import DataError

__all__ = ["RemapLabels", "RemapLabelsd"]


class RemapLabels(Transform):
    """Map label values with ``{source_id: target_id}``; every value not in the map (including negative values and
    values above the largest source id) becomes background 0.

    Args:
        label_map: source label id -> target label id, both non-negative integers.
        dtype: dtype of the output (an integer numpy dtype that holds every target id).

    Raises:
        ValueError: at construction, for a negative id or a target id that ``dtype`` cannot hold.
        DataError: at call, for non-integer label values (a mask resampled with linear interpolation, or not a
            mask at all); the message names ``source`` or the input's ``filename_or_obj`` when known.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, label_map: Mapping[int, int], dtype: DtypeLike = np.uint8) -> None:
        self.label_map = {int(k): int(v) for k, v in label_map.items()}
        if any(k < 0 or v < 0 for k, v in self.label_map.items()):
            raise ValueError(f"label_map ids must be non-negative, got {self.label_map}")
        self.dtype = np.dtype(dtype)
        if self.label_map and max(self.label_map.values()) > np.iinfo(self.dtype).max:
            raise ValueError(f"target ids {sorted(set(self.label_map.values()))} do not fit in {self.dtype}")
        self.lookup = np.zeros(max(self.label_map, default=0) + 1, dtype=self.dtype)
        self.lookup[list(self.label_map)] = list(self.label_map.values())

    def __call__(self, label: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        values = convert_to_numpy(label)
        if not np.issubdtype(values.dtype, np.integer) and not np.array_equal(values, np.round(values)):
            if source is None and hasattr(label, "meta"):
                source = label.meta.get("filename_or_obj")
            raise DataError(source, "label map holds non-integer values, so its ids cannot be remapped")
        ids = values.astype(np.int64)
        known = (ids >= 0) & (ids < len(self.lookup))
        remapped = np.where(known, self.lookup[np.where(known, ids, 0)], 0).astype(self.dtype)
        out, *_ = convert_to_dst_type(remapped, label, dtype=self.dtype)
        return out


class RemapLabelsd(MapTransform):
    """Dictionary form of :class:`RemapLabels`.

    Args:
        keys: keys of the label maps to remap.
        label_map: source label id -> target label id; unmapped ids become 0.
        dtype: output dtype.
        allow_missing_keys: skip keys absent from the data (unlabelled samples).
    """

    backend = RemapLabels.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_map: Mapping[int, int],
        dtype: DtypeLike = np.uint8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.remapper = RemapLabels(label_map, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.remapper(d[key])
        return d
