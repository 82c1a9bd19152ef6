"""Pixel correspondence between an augmented view and its un-augmented (reference) slice.

MONAI's spatial transforms keep a ``MetaTensor``'s affine (pixel -> world) up to date, so after random rotations and
flips the map from a view's pixels to the reference's pixels is ``inv(A_ref) @ A_view``. Stage 2 uses it to compute a
pseudo-label once per slice on the reference grid (VESSA is too slow to run on every augmented view) and to resample it
onto whichever view the trainer meets later (:func:`warp_to_view`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["ViewToReference", "ViewToReferenced", "warp_to_view"]


def _spatial_affine(image: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    if not isinstance(image, MetaTensor):
        raise TypeError("ViewToReference needs MetaTensor inputs (track_meta on) to read their affines")
    affine = image.affine.to(torch.float64)
    keep = [*range(spatial_dims), affine.shape[0] - 1]
    return affine[keep][:, keep]


class ViewToReference(Transform):
    """``(view, reference)`` channel-first images -> the ``[D+1, D+1]`` homogeneous matrix mapping the view's pixel
    indices to the reference's (``p_ref = M @ p_view``), from the two images' affines.

    Args:
        spatial_dims: number of spatial dimensions (2 for slices).
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        self.spatial_dims = spatial_dims

    def __call__(self, view: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        a_view = _spatial_affine(view, self.spatial_dims)
        a_ref = _spatial_affine(reference, self.spatial_dims)
        return (torch.linalg.inv(a_ref) @ a_view).to(torch.float32)


class ViewToReferenced(MapTransform):
    """Dictionary wrapper of :class:`ViewToReference`: stores the matrix of ``keys`` relative to ``ref_key`` under
    ``name`` (one name per key)."""

    def __init__(
        self,
        keys: KeysCollection,
        ref_key: str,
        names: KeysCollection,
        spatial_dims: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != len(self.keys):
            raise ValueError(f"need one name per key, got {len(self.names)} names for {len(self.keys)} keys")
        self.converter = ViewToReference(spatial_dims)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            d[name] = self.converter(d[key], d[self.ref_key])
        return d


def warp_to_view(maps: torch.Tensor, view_to_reference: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resample maps defined on the reference grid onto the view grid.

    Args:
        maps: ``[B, C, H, W]`` maps on the reference grid (labels as float for ``mode="nearest"``).
        view_to_reference: ``[B, 3, 3]`` matrices from :class:`ViewToReference` (view pixel -> reference pixel).
        mode: ``"nearest"`` or ``"bilinear"``.

    Returns:
        ``[B, C, H, W]`` maps on the view grid; pixels whose source lies outside the reference are 0.
    """
    b, _, h, w = maps.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=maps.device, dtype=torch.float32),
        torch.arange(w, device=maps.device, dtype=torch.float32),
        indexing="ij",
    )
    pixels = torch.stack((ys.flatten(), xs.flatten(), torch.ones_like(ys.flatten())))  # [3, H*W] as (row, col, 1)
    source = view_to_reference.to(device=maps.device, dtype=torch.float32) @ pixels  # [B, 3, H*W]
    # grid_sample wants (x = column, y = row) in [-1, 1] with align_corners=True
    grid_x = source[:, 1] * (2.0 / max(w - 1, 1)) - 1.0
    grid_y = source[:, 0] * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((grid_x, grid_y), dim=-1).view(b, h, w, 2)
    return F.grid_sample(maps.float(), grid, mode=mode, padding_mode="zeros", align_corners=True)
