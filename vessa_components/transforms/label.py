"""Label-map checks that turn silent training corruption into a clear error naming the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform

from ..data.errors import DataError

__all__ = ["CheckLabelRange", "CheckLabelRanged"]


class CheckLabelRange(Transform):
    """Raise :class:`DataError` when a label map holds a value outside ``0 .. num_classes - 1`` (or a non-integer).

    Args:
        num_classes: number of classes including background.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, label: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        values = torch.unique(torch.as_tensor(label))
        bad = values[(values < 0) | (values >= self.num_classes) | (values != torch.round(values))]
        if bad.numel():
            if source is None and hasattr(label, "meta"):
                source = label.meta.get("filename_or_obj")
            shown = [int(v) if float(v).is_integer() else v for v in bad.tolist()]
            raise DataError(
                source, f"label values {shown} outside the declared classes 0..{self.num_classes - 1}"
            )
        return label


class CheckLabelRanged(MapTransform):
    """Dictionary form of :class:`CheckLabelRange`."""

    def __init__(self, keys: KeysCollection, num_classes: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckLabelRange(num_classes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.checker(d[key])
        return d
