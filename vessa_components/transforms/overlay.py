"""Template overlays: a greyscale template slice with its class mask blended in colour and outlined, the second image
of a VESSA prompt ("Image 2 shows a reference slice with the {class} outlined").

:func:`monai.visualize.blend_images` colours labels through a named matplotlib colour map, so it cannot paint one
chosen RGB colour, and it works through numpy; the blend here is the same convex combination, in torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils_morphological_ops import erode
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["TemplateOverlay", "TemplateOverlayd"]


class TemplateOverlay(Transform):
    """Blend a binary mask onto a greyscale image in one colour and draw its contour.

    Inside the mask each RGB pixel is ``(1 - alpha) * image + alpha * color``; on the contour (the mask minus its
    erosion, ``contour_width`` pixels wide, closed along the image border) it is ``color``; elsewhere it is the image.

    Args:
        color: RGB colour of the mask, each channel in [0, 1] (default red).
        alpha: opacity of the mask fill, in [0, 1] (0 shows only the contour).
        contour: whether to draw the contour, fully opaque.
        contour_width: contour thickness in pixels.

    Returns (on call): a float32 tensor [3, H, W] in [0, 1].
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        color: Sequence[float] = (1.0, 0.0, 0.0),
        alpha: float = 0.5,
        contour: bool = True,
        contour_width: int = 1,
    ) -> None:
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"color must be three RGB values in [0, 1], got {tuple(color)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if contour_width < 1:
            raise ValueError(f"contour_width must be at least 1 pixel, got {contour_width}")
        self.color = torch.tensor([float(c) for c in color], dtype=torch.float32).view(3, 1, 1)
        self.alpha = float(alpha)
        self.contour = contour
        self.contour_width = int(contour_width)

    def __call__(self, image: NdarrayOrTensor, mask: NdarrayOrTensor) -> torch.Tensor:
        """
        Args:
            image: greyscale image [1, H, W] with intensities in [0, 1] (values outside are clipped).
            mask: binary mask [1, H, W] (any non-zero value counts as inside).
        """
        image_t = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        mask_t = convert_to_tensor(mask, track_meta=False) != 0
        if image_t.ndim != 3 or image_t.shape[0] != 1:
            raise ValueError(f"image must be [1, H, W], got shape {tuple(image_t.shape)}")
        if mask_t.shape != image_t.shape:
            raise ValueError(f"mask shape {tuple(mask_t.shape)} differs from image shape {tuple(image_t.shape)}")
        weight = self.alpha * mask_t.float()
        if self.contour:
            inside = mask_t.float()[None]
            # zero padding erodes the mask along the image border too, so the outline stays closed there
            eroded = erode(inside, filter_size=2 * self.contour_width + 1, pad_value=0.0)[0]
            weight = torch.where(mask_t & (eroded == 0), 1.0, weight)
        color = self.color.to(image_t.device)
        return (1.0 - weight) * image_t.clamp(0.0, 1.0).expand(3, -1, -1) + weight * color


class TemplateOverlayd(MapTransform):
    """Dictionary form of :class:`TemplateOverlay`: reads the template image and mask, writes the RGB overlay.

    Args:
        image_key: key of the greyscale template image [1, H, W].
        mask_key: key of its binary class mask [1, H, W].
        overlay_key: key the RGB overlay [3, H, W] is written to.
        color, alpha, contour, contour_width: see :class:`TemplateOverlay`.
        allow_missing_keys: leave the data unchanged when the image or mask is absent.
    """

    backend = TemplateOverlay.backend

    def __init__(
        self,
        image_key: str = "template_image",
        mask_key: str = "template_mask",
        overlay_key: str = "template_overlay",
        color: Sequence[float] = (1.0, 0.0, 0.0),
        alpha: float = 0.5,
        contour: bool = True,
        contour_width: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        keys: KeysCollection = [image_key, mask_key]
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.mask_key, self.overlay_key = image_key, mask_key, overlay_key
        self.overlay = TemplateOverlay(color=color, alpha=alpha, contour=contour, contour_width=contour_width)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if len(list(self.key_iterator(d))) < 2:  # only reachable with allow_missing_keys
            return d
        d[self.overlay_key] = self.overlay(d[self.image_key], d[self.mask_key])
        return d
