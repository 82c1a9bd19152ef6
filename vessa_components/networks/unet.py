"""The 2D UNet student of the semi-supervised ACDC benchmarks, with UniMatch V2's complementary channel dropout.

The architecture is the ``UNet`` of SSL4MIS (``networks/unet.py``), which UniMatch's ACDC code and the published
1-5 % label tables train from scratch: five encoder levels of (16, 32, 64, 128, 256) channels, each a
conv3x3-BN-LeakyReLU-dropout-conv3x3-BN-LeakyReLU block, 2x2 max-pooling between levels, a decoder that upsamples,
concatenates the skip feature and applies the same block without dropout, and a 3x3 output convolution (SSL4MIS's
``out_conv``). With one input channel and four classes it has 1.81 M parameters.

This module also holds the two helpers both students share: the complementary channel masks and the
pad-to-a-multiple / crop-back pair that lets the networks take any slice size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "complementary_channel_scales", "pad_to_multiple", "crop_to_size"]


def complementary_channel_scales(
    num_pairs: int, num_channels: int, exact_half: bool, pair_fraction: float, feature: torch.Tensor
) -> torch.Tensor:
    """Per-sample channel scales that make two strong views drop complementary halves of the channels.

    The batch the scales apply to is ``[view_1; view_2]`` with ``num_pairs`` samples per view. For each pair a
    binary channel mask ``m`` is drawn; the first view is scaled by ``2 * m`` and the second by ``2 * (1 - m)``,
    so every channel is zeroed in exactly one of the two views and the expected magnitude is unchanged
    (UniMatch V2's complementary dropout).

    Args:
        num_pairs: number of samples per view (half the batch).
        num_channels: number of feature channels.
        exact_half: ``True`` keeps exactly ``num_channels // 2`` channels in the first view (a random permutation's
            first half); ``False`` keeps each channel with probability 0.5, as UniMatch V2's binomial mask does.
        pair_fraction: fraction of the pairs that get the complementary masks; the other pairs keep all their
            channels unscaled. UniMatch V2 perturbs half of the pairs (0.5); 1.0 perturbs every pair.
        feature: a tensor whose device and dtype the scales take.

    Returns:
        a ``(2 * num_pairs, num_channels)`` tensor of scales in {0, 1, 2}.
    """
    if exact_half:
        order = torch.rand(num_pairs, num_channels, device=feature.device).argsort(dim=1)
        keep = torch.zeros(num_pairs, num_channels, device=feature.device)
        keep = keep.scatter(1, order[:, : num_channels // 2], 1.0)
    else:
        keep = (torch.rand(num_pairs, num_channels, device=feature.device) < 0.5).float()
    first_view = keep * 2.0
    num_intact = int(num_pairs * (1.0 - pair_fraction))
    if num_intact > 0:
        intact_pairs = torch.randperm(num_pairs, device=feature.device)[:num_intact]
        first_view = first_view.index_fill(0, intact_pairs, 1.0)
    # 2 - 2m = 2(1 - m) for the perturbed pairs, and 2 - 1 = 1 for the intact ones.
    return torch.cat([first_view, 2.0 - first_view], dim=0).to(feature.dtype)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """Zero-pad the last two (spatial) dimensions of ``x`` symmetrically up to multiples of ``multiple``.

    Zero is the background intensity of the normalised slices the students see, and the padded border is cropped
    away again by :func:`crop_to_size`, so any slice size can go through networks that need divisible sizes.

    Returns:
        the padded tensor and the (top, left) padding in pixels.
    """
    height, width = x.shape[-2], x.shape[-1]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    top, left = pad_h // 2, pad_w // 2
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [left, pad_w - left, top, pad_h - top])
    return x, top, left


def crop_to_size(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Crop the ``height`` x ``width`` window at (``top``, ``left``) from the last two dimensions of ``x``."""
    return x[..., top : top + height, left : left + width]


class ConvBlock(nn.Sequential):
    """conv3x3-BN-LeakyReLU-dropout-conv3x3-BN-LeakyReLU, keeping the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class DownBlock(nn.Sequential):
    """2x2 max-pooling (half the spatial size) followed by a :class:`ConvBlock`."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, dropout))


class UpBlock(nn.Module):
    """Upsample the deeper feature 2x to the skip feature's channels, concatenate ``[skip, up]``, apply a ConvBlock.

    ``upsample="bilinear"`` is a 1x1 convolution followed by bilinear interpolation (``align_corners=True``, as
    SSL4MIS); ``"transposed"`` is a 2x2 transposed convolution with stride 2.
    """

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int, upsample: str) -> None:
        super().__init__()
        if upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Conv2d(deep_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            )
        elif upsample == "transposed":
            self.up = nn.Sequential(nn.ConvTranspose2d(deep_channels, skip_channels, kernel_size=2, stride=2))
        else:
            raise ValueError(f"upsample must be 'bilinear' or 'transposed', got {upsample!r}.")
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(deep)], dim=1))


class UNetEncoder(nn.Module):
    """The contracting path: returns the feature map of every level, finest first."""

    def __init__(self, in_channels: int, features: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        self.in_conv = ConvBlock(in_channels, features[0], dropout[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(features[i - 1], features[i], dropout[i]) for i in range(1, len(features))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.in_conv(x)
        levels = [x]
        for down in self.down_blocks:
            x = down(x)
            levels.append(x)
        return levels


class UNetDecoder(nn.Module):
    """The expanding path: from the encoder's levels (finest first) to per-class logits at the finest level."""

    def __init__(self, out_channels: int, features: Sequence[int], upsample: str) -> None:
        super().__init__()
        self.up_blocks = nn.ModuleList(
            UpBlock(features[i], features[i - 1], features[i - 1], upsample) for i in range(len(features) - 1, 0, -1)
        )
        self.out_conv = nn.Conv2d(features[0], out_channels, kernel_size=3, padding=1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = levels[-1]
        for i, up in enumerate(self.up_blocks):
            x = up(x, levels[-2 - i])
        return self.out_conv(x)


class UNet(nn.Module):
    """SSL4MIS's 2D UNet (1.81 M parameters for 1 input channel and 4 classes) with complementary channel dropout.

    Any input height and width is accepted: the input is zero-padded symmetrically to multiples of
    ``2 ** (len(features) - 1)`` (16 by default) and the logits are cropped back to the input size.

    Args:
        in_channels: number of image channels.
        out_channels: number of classes (background included); the output is logits.
        features: channels of the encoder levels, finest first.
        dropout: dropout probability inside each encoder level's conv block (the decoder has none).
        upsample: ``"bilinear"`` (1x1 conv + bilinear interpolation, SSL4MIS's default) or ``"transposed"``.
        comp_drop_exact_half: complementary dropout keeps exactly half the channels of each feature in the first
            strong view (``True``), or each channel with probability 0.5 (``False``, UniMatch V2's binomial mask).
        comp_drop_pair_fraction: fraction of the sample pairs that receive complementary dropout; the others pass
            unchanged. 0.5 is UniMatch V2's released code, 1.0 perturbs every pair.

    ``forward(x, comp_drop=True)`` in training mode expects ``x = cat([strong_view_1, strong_view_2])`` (an even
    batch, pair ``i`` is samples ``i`` and ``i + B/2``) and applies complementary channel dropout to every encoder
    level the decoder reads (the four skip features and the bottleneck, as UniMatch's ACDC UNet perturbs all of
    them), with an independent mask per level and per pair. In evaluation mode, or with ``comp_drop=False``,
    nothing is dropped. ``forward(x)`` is TorchScript-compatible (``torch.jit.script``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        upsample: str = "bilinear",
        comp_drop_exact_half: bool = True,
        comp_drop_pair_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if len(features) != len(dropout) or len(features) < 2:
            raise ValueError(
                f"features and dropout need one entry per encoder level (at least 2), got {len(features)} and "
                f"{len(dropout)}."
            )
        if not 0.0 <= comp_drop_pair_fraction <= 1.0:
            raise ValueError(f"comp_drop_pair_fraction must be in [0, 1], got {comp_drop_pair_fraction}.")
        self.size_multiple = 2 ** (len(features) - 1)
        self.comp_drop_exact_half = comp_drop_exact_half
        self.comp_drop_pair_fraction = float(comp_drop_pair_fraction)
        self.encoder = UNetEncoder(in_channels, features, dropout)
        self.decoder = UNetDecoder(out_channels, features, upsample)

    def forward(self, x: torch.Tensor, comp_drop: bool = False) -> torch.Tensor:
        """Logits of shape ``(B, out_channels, H, W)`` for images of shape ``(B, in_channels, H, W)``."""
        height, width = x.shape[-2], x.shape[-1]
        x, top, left = pad_to_multiple(x, self.size_multiple)
        levels = self.encoder(x)
        if comp_drop and self.training:
            levels = self._complementary_dropout(levels)
        return crop_to_size(self.decoder(levels), top, left, height, width)

    def _complementary_dropout(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        batch = levels[0].shape[0]
        if batch % 2 != 0:
            raise ValueError(f"comp_drop needs a batch of two concatenated views (even size), got {batch}.")
        dropped: list[torch.Tensor] = []
        for level in levels:
            scales = complementary_channel_scales(
                batch // 2, level.shape[1], self.comp_drop_exact_half, self.comp_drop_pair_fraction, level
            )
            dropped.append(level * scales[:, :, None, None])
        return dropped
