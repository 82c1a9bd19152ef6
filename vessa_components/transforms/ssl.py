"""Views for weak-to-strong consistency training (UniMatch V2): CutMix boxes and their application to a batch."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["RandCutMixBox", "RandCutMixBoxd", "cutmix_with_flipped_batch"]


class RandCutMixBox(Randomizable):
    """Draw a CutMix box mask for one sample, as UniMatch does: with probability ``prob`` a rectangle whose area is a
    fraction ``area`` of the image and whose aspect ratio lies in ``aspect`` is set to 1, the rest is 0.

    Args:
        spatial_size: (H, W) of the mask, in pixels.
        prob: probability that the sample gets a box at all (an all-zero mask otherwise).
        area: (min, max) fraction of the image area covered by the box.
        aspect: (min, max) height/width ratio of the box.
    """

    def __init__(
        self,
        spatial_size: Sequence[int],
        prob: float = 0.5,
        area: tuple[float, float] = (0.02, 0.4),
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.prob = prob
        self.area = area
        self.aspect = aspect

    def __call__(self) -> torch.Tensor:
        h, w = self.spatial_size
        mask = torch.zeros((1, h, w), dtype=torch.float32)
        if self.R.random_sample() >= self.prob:
            return mask
        for _ in range(100):  # rejection sampling until the box fits in the image
            box_area = self.R.uniform(*self.area) * h * w
            ratio = self.R.uniform(*self.aspect)
            box_h, box_w = int(math.sqrt(box_area * ratio)), int(math.sqrt(box_area / ratio))
            if 0 < box_h <= h and 0 < box_w <= w:
                break
        else:
            box_h, box_w = h // 2, w // 2
        top = self.R.randint(0, h - box_h + 1)
        left = self.R.randint(0, w - box_w + 1)
        mask[:, top : top + box_h, left : left + box_w] = 1.0
        return mask

    def randomize(self, data: Any = None) -> None:  # boxes are drawn in __call__
        pass


class RandCutMixBoxd(Randomizable, MapTransform):
    """Add one independent CutMix box mask (shape [1, H, W]) per key, sized like ``data[ref_key]``'s spatial shape.

    Args:
        keys: names of the masks to create, e.g. ``["cutmix_box1", "cutmix_box2"]``.
        ref_key: the image whose spatial size the boxes take.
        prob, area, aspect: see :class:`RandCutMixBox`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str = "image",
        prob: float = 0.5,
        area: tuple[float, float] = (0.02, 0.4),
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.ref_key = ref_key
        self.box = RandCutMixBox((1, 1), prob=prob, area=area, aspect=aspect)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandCutMixBoxd:
        super().set_random_state(seed, state)
        self.box.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.box.spatial_size = tuple(d[self.ref_key].shape[-2:])
        for key in self.keys:
            d[key] = self.box()
        return d


def cutmix_with_flipped_batch(values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Paste, inside each sample's box, the content of its partner ``values.flip(0)`` (UniMatch's CutMix).

    Args:
        values: batch ``[B, ...]`` of images ``[B, C, H, W]`` or per-pixel maps ``[B, H, W]``.
        boxes: ``[B, 1, H, W]`` or ``[B, H, W]`` masks, 1 inside the box.
    """
    boxes = boxes.reshape(boxes.shape[0], *boxes.shape[-2:]).bool()
    if values.ndim == 4:
        boxes = boxes.unsqueeze(1)
    return torch.where(boxes, values.flip(0), values)
