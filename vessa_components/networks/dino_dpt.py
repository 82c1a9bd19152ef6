"""UniMatch V2's student: a DINOv2 encoder (``transformers.Dinov2Model``) with a DPT segmentation head.

The encoder's tokens from four intermediate layers (layer-normalised, class token dropped, as DINOv2's
``get_intermediate_layers(..., norm=True)``) are reshaped to the patch grid, projected by 1x1 convolutions and
resized to 4x, 2x, 1x and 1/2x the grid; RefineNet-style fusion blocks merge them from coarse to fine and a small
convolutional head gives class logits, upsampled to the (padded) input size. Head widths and layer indices follow
UniMatch V2's ``DPT`` for each DINOv2 size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from .unet import complementary_channel_scales, crop_to_size, pad_to_multiple

__all__ = ["DinoDPT", "DPTHead", "DinoPreset", "DINO_PRESETS"]


@dataclass(frozen=True)
class DinoPreset:
    """Sizes of one DINOv2 backbone and of the DPT head UniMatch V2 pairs with it.

    Attributes:
        hidden_size: token width of the ViT.
        num_layers: number of transformer blocks.
        num_heads: number of attention heads.
        intermediate_layers: 0-based indices of the four blocks whose outputs feed the head, shallow to deep.
        head_features: channel width of the fusion path.
        head_projections: channels of the four 1x1 projections of the intermediate features.
        use_swiglu_ffn: whether the blocks use SwiGLU MLPs (DINOv2 giant).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_layers: tuple[int, int, int, int]
    head_features: int
    head_projections: tuple[int, int, int, int]
    use_swiglu_ffn: bool = False


DINO_PRESETS: dict[str, DinoPreset] = {
    # about 0.3 M parameters, for tests and CPU smoke runs
    "tiny": DinoPreset(48, 4, 3, (0, 1, 2, 3), 16, (12, 24, 48, 48)),
    "small": DinoPreset(384, 12, 6, (2, 5, 8, 11), 64, (48, 96, 192, 384)),
    "base": DinoPreset(768, 12, 12, (2, 5, 8, 11), 128, (96, 192, 384, 768)),
    "large": DinoPreset(1024, 24, 16, (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
    "giant": DinoPreset(1536, 40, 24, (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536), use_swiglu_ffn=True),
}

# position embeddings of the released DINOv2 checkpoints cover a 518 x 518 image (37 x 37 patches of 14)
_DINOV2_IMAGE_SIZE = 518


class ResidualConvUnit(nn.Module):
    """ReLU-conv3x3-ReLU-conv3x3 with an identity shortcut, keeping channels and size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # not in place: ``x`` is also the shortcut
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: add the refined lateral feature (when ``with_lateral``), refine, resize, 1x1 conv.

    The deepest block of the DPT head has no lateral input; it is built without the lateral unit, which the
    reference code creates but never uses (unused parameters break distributed training's gradient reduction).
    """

    def __init__(self, channels: int, with_lateral: bool = True) -> None:
        super().__init__()
        self.lateral_unit = ResidualConvUnit(channels) if with_lateral else None
        self.fused_unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, lateral: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Fuse ``x`` (the coarser path) with ``lateral``, then resize to ``size`` (default: twice ``x``'s size)."""
        if lateral is not None:
            if self.lateral_unit is None:
                raise ValueError("This fusion block was built without a lateral input (with_lateral=False).")
            x = x + self.lateral_unit(lateral)
        x = self.fused_unit(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """The DPT head of UniMatch V2 (from Depth Anything) for four ViT token maps.

    Args:
        in_channels: token width of the encoder.
        out_channels: number of classes.
        features: channel width of the fusion path.
        projections: channels of the 1x1 projections of the four token maps, shallow to deep.

    The output has 8x the patch grid's size (4x from the first resize, 2x from the last fusion block).
    """

    def __init__(self, in_channels: int, out_channels: int, features: int, projections: Sequence[int]) -> None:
        super().__init__()
        if len(projections) != 4:
            raise ValueError(f"DPTHead takes four intermediate features, got {len(projections)} projections.")
        self.projections = nn.ModuleList(nn.Conv2d(in_channels, c, kernel_size=1) for c in projections)
        self.resizes = nn.ModuleList(
            [
                nn.ConvTranspose2d(projections[0], projections[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(projections[1], projections[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(projections[3], projections[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.laterals = nn.ModuleList(nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False) for c in projections)
        self.fusions = nn.ModuleList(FeatureFusionBlock(features, with_lateral=i < 3) for i in range(4))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, out_channels, kernel_size=1),
        )

    def forward(self, tokens: Sequence[torch.Tensor], patch_h: int, patch_w: int) -> torch.Tensor:
        """Logits at 8x the patch grid from four ``(B, patch_h * patch_w, in_channels)`` token maps."""
        maps = []
        for token_map, project, resize, lateral in zip(tokens, self.projections, self.resizes, self.laterals):
            grid = token_map.transpose(1, 2).reshape(token_map.shape[0], token_map.shape[2], patch_h, patch_w)
            maps.append(lateral(resize(project(grid))))
        # coarse to fine: the deepest map is fused alone, each next one receives the finer lateral map
        path = self.fusions[3](maps[3], size=maps[2].shape[-2:])
        path = self.fusions[2](path, maps[2], size=maps[1].shape[-2:])
        path = self.fusions[1](path, maps[1], size=maps[0].shape[-2:])
        path = self.fusions[0](path, maps[0])
        return self.output_conv(path)


class DinoDPT(nn.Module):
    """DINOv2 + DPT segmentation network, UniMatch V2's student, for images of any size.

    Args:
        in_channels: channels of the input images; a 1-channel image is repeated to the backbone's 3 channels.
        out_channels: number of classes (background included); the output is logits.
        backbone_size: a key of :data:`DINO_PRESETS` (``"tiny"``, ``"small"``, ``"base"``, ``"large"``,
            ``"giant"``): the backbone built when ``pretrained_path`` is empty, the intermediate layers and the
            head widths.
        pretrained_path: a local directory holding a ``Dinov2Model`` in Hugging Face format (``config.json`` and
            weights), loaded with ``Dinov2Model.from_pretrained``; nothing is downloaded. ``None`` or ``""``
            builds the preset's architecture with random weights. The loaded model's hidden size must match the
            preset's.
        patch_size: ViT patch size in pixels of the randomly initialised backbone (a loaded one keeps its own).
        hidden_size: overrides the preset's token width (random backbone only).
        num_layers: overrides the preset's depth (random backbone only); the intermediate layers then default to
            the ends of the four quarters of the depth.
        num_heads: overrides the preset's number of attention heads (random backbone only).
        intermediate_layers: overrides the 0-based indices of the four blocks that feed the head.
        head_features: overrides the fusion width of the head.
        head_projections: overrides the four projection widths of the head.
        image_mean: per-channel mean subtracted after the channel repeat (e.g. ImageNet's
            ``(0.485, 0.456, 0.406)`` for pretrained DINOv2 weights on images scaled to [0, 1]); ``None``: none.
        image_std: per-channel standard deviation the input is divided by after the mean (e.g.
            ``(0.229, 0.224, 0.225)``); ``None``: none.
        comp_drop_exact_half: complementary dropout keeps each channel with probability 0.5 (``False``,
            UniMatch V2's binomial mask) or exactly half of the channels (``True``).
        comp_drop_pair_fraction: fraction of the sample pairs that receive complementary dropout (UniMatch V2: 0.5).

    The input is zero-padded symmetrically to multiples of the patch size (zero is the background of normalised
    slices; padding keeps the pixel grid, where resizing would blur thin structures) and the logits are cropped
    back to the input size. ``forward(x, comp_drop=True)`` in training mode expects
    ``x = cat([strong_view_1, strong_view_2])`` and, as UniMatch V2, draws one channel mask per sample pair that
    scales the four intermediate token maps of the first view by ``2 * m`` and of the second by ``2 * (1 - m)``.
    ``backbone`` and ``head`` are attributes so a trainer can give them different learning rates.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 4,
        backbone_size: str = "small",
        pretrained_path: str | os.PathLike | None = None,
        patch_size: int = 14,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        intermediate_layers: Sequence[int] | None = None,
        head_features: int | None = None,
        head_projections: Sequence[int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        comp_drop_exact_half: bool = False,
        comp_drop_pair_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if backbone_size not in DINO_PRESETS:
            raise ValueError(f"backbone_size must be one of {sorted(DINO_PRESETS)}, got {backbone_size!r}.")
        if not 0.0 <= comp_drop_pair_fraction <= 1.0:
            raise ValueError(f"comp_drop_pair_fraction must be in [0, 1], got {comp_drop_pair_fraction}.")
        preset = DINO_PRESETS[backbone_size]
        if pretrained_path:
            self.backbone = _load_backbone(Path(pretrained_path), preset)
        else:
            self.backbone = Dinov2Model(
                Dinov2Config(
                    hidden_size=hidden_size or preset.hidden_size,
                    num_hidden_layers=num_layers or preset.num_layers,
                    num_attention_heads=num_heads or preset.num_heads,
                    patch_size=patch_size,
                    image_size=_DINOV2_IMAGE_SIZE,
                    use_swiglu_ffn=preset.use_swiglu_ffn,
                )
            )
        config = self.backbone.config
        depth = config.num_hidden_layers
        if intermediate_layers is None:
            intermediate_layers = (
                preset.intermediate_layers if depth == preset.num_layers else [depth * q // 4 - 1 for q in (1, 2, 3, 4)]
            )
        if len(intermediate_layers) != 4 or not all(0 <= i < depth for i in intermediate_layers):
            raise ValueError(
                f"intermediate_layers must be four block indices in [0, {depth}), got {intermediate_layers}."
            )
        if in_channels not in (1, config.num_channels):
            raise ValueError(
                f"in_channels must be 1 (repeated) or the backbone's {config.num_channels}, got {in_channels}."
            )
        self.in_channels = in_channels
        self.patch_size = config.patch_size
        self.intermediate_layers = tuple(intermediate_layers)
        self.comp_drop_exact_half = comp_drop_exact_half
        self.comp_drop_pair_fraction = float(comp_drop_pair_fraction)
        self.register_buffer("image_mean", _channel_stats(image_mean, 0.0, config.num_channels), persistent=False)
        self.register_buffer("image_std", _channel_stats(image_std, 1.0, config.num_channels), persistent=False)
        self.head = DPTHead(
            config.hidden_size,
            out_channels,
            head_features or preset.head_features,
            head_projections or preset.head_projections,
        )

    def forward(self, x: torch.Tensor, comp_drop: bool = False) -> torch.Tensor:
        """Logits of shape ``(B, out_channels, H, W)`` for images of shape ``(B, in_channels, H, W)``."""
        height, width = x.shape[-2:]
        # pad before normalising, so the border has the images' own background value 0
        x, top, left = pad_to_multiple(x, self.patch_size)
        if self.in_channels == 1:
            x = x.expand(-1, self.backbone.config.num_channels, -1, -1)
        x = (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]
        patch_h, patch_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.intermediate_tokens(x)
        if comp_drop and self.training:
            tokens = self._complementary_dropout(tokens)
        logits = self.head(tokens, patch_h, patch_w)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return crop_to_size(logits, top, left, height, width)

    def intermediate_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Layer-normalised patch tokens ``(B, N, hidden)`` of the intermediate blocks for padded images ``x``."""
        hidden_states = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i; token 0 is CLS
        return [self.backbone.layernorm(hidden_states[i + 1])[:, 1:] for i in self.intermediate_layers]

    def _complementary_dropout(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        batch, channels = tokens[0].shape[0], tokens[0].shape[-1]
        if batch % 2 != 0:
            raise ValueError(f"comp_drop needs a batch of two concatenated views (even size), got {batch}.")
        # one mask per pair shared by the four layers, as UniMatch V2
        scales = complementary_channel_scales(
            batch // 2, channels, self.comp_drop_exact_half, self.comp_drop_pair_fraction, tokens[0]
        )
        return [t * scales[:, None, :] for t in tokens]


def _load_backbone(path: Path, preset: DinoPreset) -> Dinov2Model:
    """Load a local Hugging Face ``Dinov2Model`` directory, checking it exists and fits the preset's head."""
    if not path.is_dir():
        raise FileNotFoundError(f"DINOv2 pretrained_path {str(path)!r} is not a directory (Hugging Face format).")
    backbone = Dinov2Model.from_pretrained(path, local_files_only=True)
    if backbone.config.hidden_size != preset.hidden_size:
        raise ValueError(
            f"The DINOv2 model in {str(path)!r} has hidden size {backbone.config.hidden_size}, but the chosen "
            f"backbone_size expects {preset.hidden_size}."
        )
    return backbone


def _channel_stats(values: Sequence[float] | None, default: float, channels: int) -> torch.Tensor:
    """A ``(channels,)`` tensor of per-channel ``values`` (``default`` everywhere when ``None``)."""
    if values is None:
        return torch.full((channels,), default)
    if len(values) != channels:
        raise ValueError(f"Expected {channels} per-channel values, got {len(values)}.")
    return torch.as_tensor(values, dtype=torch.float32)
