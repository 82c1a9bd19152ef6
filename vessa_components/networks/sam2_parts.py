"""The SAM2 parts of VESSA, built from the ``sam2`` package's own configs and modules.

VESSA uses SAM2 for one reference-guided step rather than for video tracking: the target slice and the template
slice go through the Hiera image encoder; the memory encoder turns (template features, template mask) into a
memory; memory attention conditions the target's features on it; the prompt encoder and the mask decoder turn the
conditioned features plus sparse prompt tokens (VESSA's projected ``<SEG>`` embedding, optional box and points) and
an optional dense mask prompt into the class's mask logits.

:func:`build_sam2_model` builds ``sam2.modeling.sam2_base.SAM2Base`` with ``sam2.build_sam.build_sam2`` from a SAM2
config and hydra overrides (:data:`SAM2_PRESETS` holds a tiny CPU variant), optionally loading a checkpoint in
SAM2's own format. :class:`Sam2Parts` keeps the submodules VESSA calls, under SAM2's attribute names, and exposes
one method per part, each following what ``SAM2Base`` does for a conditioning frame and its first memory frame.

Images are square, ``image_size`` pixels a side (SAM2's prompt encoder and rotary attention assume a square grid);
features are at stride 16 (``image_size / 16`` a side), low-resolution masks and the dense mask prompt at stride 4.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from torch import nn

__all__ = [
    "SAM2_DEFAULT_CONFIG",
    "SAM2_IMAGE_MEAN",
    "SAM2_IMAGE_STD",
    "SAM2_PRESETS",
    "Sam2Parts",
    "build_sam2_model",
    "count_parameters",
    "load_sam2_checkpoint",
]

SAM2_DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"

# SAM2 normalises [0, 1] RGB images with the ImageNet statistics (``sam2.utils.transforms.SAM2Transforms``).
SAM2_IMAGE_MEAN = (0.485, 0.456, 0.406)
SAM2_IMAGE_STD = (0.229, 0.224, 0.225)

SAM2_PRESETS: dict[str, tuple[str, ...]] = {
    # The config as published (sam2.1_hiera_t: 38.96 M parameters, 1024-pixel images).
    "full": (),
    # Same architecture, tiny widths: Hiera 8 -> 64 channels over stages of (1, 1, 2, 1) blocks with one global
    # attention block (a global block must not also be a query-pooling block, i.e. the first of a stage), a 32-wide
    # neck / prompt space, one memory-attention layer and a 16-wide memory, on 128-pixel images. About 0.65 M
    # parameters, most of them in the parts whose widths SAM2 fixes (mask decoder MLPs, mask downsampler).
    "tiny_cpu": (
        "++model.image_size=128",
        "++model.image_encoder.trunk.embed_dim=8",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.neck.d_model=32",
        "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
        "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
        "++model.memory_attention.d_model=32",
        "++model.memory_attention.num_layers=1",
        "++model.memory_attention.layer.d_model=32",
        "++model.memory_attention.layer.dim_feedforward=64",
        "++model.memory_attention.layer.self_attention.embedding_dim=32",
        "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
        "++model.memory_attention.layer.cross_attention.embedding_dim=32",
        "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
        "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
        "++model.memory_encoder.in_dim=32",
        "++model.memory_encoder.out_dim=16",
        "++model.memory_encoder.position_encoding.num_pos_feats=16",
        "++model.memory_encoder.mask_downsampler.embed_dim=32",
        "++model.memory_encoder.fuser.layer.dim=32",
    ),
    # Twice tiny_cpu's widths (Hiera 16 -> 128 channels, a 64-wide neck, memory attention and memory of 64 and 32):
    # what the CPU benchmarks train, enough to learn the ACDC classes from a few cases in minutes.
    "small_cpu": (
        "++model.image_size=128",
        "++model.image_encoder.trunk.embed_dim=16",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,2,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[4]",
        "++model.image_encoder.neck.d_model=64",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
        "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
        "++model.memory_attention.d_model=64",
        "++model.memory_attention.num_layers=2",
        "++model.memory_attention.layer.d_model=64",
        "++model.memory_attention.layer.dim_feedforward=128",
        "++model.memory_attention.layer.self_attention.embedding_dim=64",
        "++model.memory_attention.layer.self_attention.feat_sizes=[8,8]",
        "++model.memory_attention.layer.cross_attention.embedding_dim=64",
        "++model.memory_attention.layer.cross_attention.kv_in_dim=32",
        "++model.memory_attention.layer.cross_attention.feat_sizes=[8,8]",
        "++model.memory_encoder.in_dim=64",
        "++model.memory_encoder.out_dim=32",
        "++model.memory_encoder.position_encoding.num_pos_feats=32",
        "++model.memory_encoder.mask_downsampler.embed_dim=64",
        "++model.memory_encoder.fuser.layer.dim=64",
    ),
}

# SAM2's stride from image pixels to the top-level (memory / mask decoder) feature grid.
_BACKBONE_STRIDE = 16


def _image_size_overrides(image_size: int) -> list[str]:
    """Hydra overrides that set the model's image size and the matching rotary-attention grid (``image_size / 16``)."""
    grid = image_size // _BACKBONE_STRIDE
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


def _image_size_multiple(model: SAM2Base) -> int:
    """The number every image side must be a multiple of for the model's Hiera trunk.

    The patch embedding (stride ``p``, 4 in SAM2) is followed by windowed attention whose window positional embedding
    is tiled over the first stage's grid, so that grid must hold whole windows (``p * window_spec[0]``); each query
    pooling halves the grid, and the FPN neck upsamples the coarsest level by exactly 2, so the coarsest grid must be
    whole (``p * q_stride ** num_q_pools``). For every SAM2.1 config both give 32.
    """
    trunk = model.image_encoder.trunk
    patch_stride = trunk.patch_embed.proj.stride[0]
    coarsest_stride = patch_stride * trunk.q_stride[0] ** len(trunk.q_pool_blocks)
    return math.lcm(patch_stride * trunk.window_spec[0], coarsest_stride)


def load_sam2_checkpoint(model: SAM2Base, checkpoint: str | os.PathLike, config: str) -> None:
    """Load a checkpoint in SAM2's own format (``{"model": state_dict}``, as ``sam2.build_sam`` reads) into ``model``.

    Every key must match: a partly loaded SAM2 would silently mix pretrained and random weights.

    Args:
        model: the SAM2 model built from ``config``.
        checkpoint: path of the ``.pt`` file.
        config: the config ``model`` was built from, named in the error messages.

    Raises:
        FileNotFoundError: when ``checkpoint`` does not exist.
        ValueError: when the file cannot be read as a SAM2 checkpoint, or its keys or shapes do not match ``config``.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"cannot read SAM2 checkpoint {path}: {err}") from err
    if not isinstance(content, Mapping) or not isinstance(content.get("model"), Mapping):
        raise ValueError(
            f"SAM2 checkpoint {path} is not in SAM2's format: expected a dict with the state dict under 'model'"
        )
    mismatch = f"SAM2 checkpoint {path} does not match the model built from {config}"
    try:
        missing, unexpected = model.load_state_dict(content["model"], strict=False)
    except RuntimeError as err:  # parameters whose shapes differ
        raise ValueError(f"{mismatch}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"{mismatch}: {len(missing)} missing keys (e.g. {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})"
        )


def build_sam2_model(
    config: str = SAM2_DEFAULT_CONFIG,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    preset: str = "full",
    overrides: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> SAM2Base:
    """Build a SAM2 model from one of the ``sam2`` package's configs with ``sam2.build_sam.build_sam2``.

    The hydra overrides are applied in this order, later ones winning: the ``preset``'s, the image size's, then
    ``overrides``. SAM2's optional post-processing overrides are not applied: the mask decoder always returns its
    single-mask output (no fall-back to the multimask tokens), in training and in evaluation alike. The model is
    returned in eval mode, as ``build_sam2`` does.

    Args:
        config: config name inside the ``sam2`` package, e.g. ``configs/sam2.1/sam2.1_hiera_l.yaml``.
        checkpoint: a SAM2 checkpoint (``{"model": state_dict}``) to load; ``None`` or an empty string builds random
            weights (what tests and CPU runs use).
        image_size: side in pixels of the square images the model takes (a multiple of 32 for SAM2.1's Hiera);
            ``None`` keeps the preset's or the config's (1024 for the published configs, 128 for ``tiny_cpu``).
        preset: a key of :data:`SAM2_PRESETS`: ``"full"`` (the config as is) or ``"tiny_cpu"``.
        overrides: further hydra overrides, e.g. ``["++model.num_maskmem=1"]``.
        device: where to put the model.

    Raises:
        ValueError: for an unknown preset, an image size the encoder cannot take, or a checkpoint that does not match.
        FileNotFoundError: when ``checkpoint`` is given and does not exist.
    """
    if preset not in SAM2_PRESETS:
        raise ValueError(f"unknown SAM2 preset {preset!r}; expected one of {sorted(SAM2_PRESETS)}")
    hydra_overrides = list(SAM2_PRESETS[preset])
    if image_size is not None:
        hydra_overrides += _image_size_overrides(image_size)
    hydra_overrides += list(overrides or ())
    model = build_sam2(
        config, ckpt_path=None, device="cpu", hydra_overrides_extra=hydra_overrides, apply_postprocessing=False
    )
    multiple = _image_size_multiple(model)
    if model.image_size % multiple != 0:
        raise ValueError(
            f"SAM2 image size {model.image_size} is not supported by {config}: "
            f"the image side must be a multiple of {multiple} pixels"
        )
    if checkpoint:
        load_sam2_checkpoint(model, checkpoint, config)
    return model.to(device)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) in ``module``; with ``trainable_only`` only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``mask`` ``[B, 1, H, W]`` as float, resized to ``size`` the way SAM2 resizes mask inputs (antialiased)."""
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=True)


class Sam2Parts(nn.Module):
    """The SAM2 modules VESSA uses, with one method per step of reference-guided mask prediction.

    The submodules and parameters keep ``SAM2Base``'s attribute names, so this module's state dict is the subset of
    a SAM2 checkpoint's keys that VESSA uses (the video-only object-pointer parts are left out).

    Simplifications against SAM2's video tracking, where one template plays the conditioning frame:

    - one memory per target (the template's), with the temporal encoding of a conditioning frame;
    - no object pointers in memory attention (they come from running the decoder on the template);
    - no memory (``condition_on_memory(features, None)``) adds the learned no-memory embedding, as SAM2 does on the
      first frame (``directly_add_no_mem_embed``, set in every SAM2.1 config);
    - masks are not replaced by a constant where the object score is negative: the score is returned instead, so the
      mask logits stay differentiable everywhere.

    Args:
        sam2: a model from :func:`build_sam2_model`.
    """

    def __init__(self, sam2: SAM2Base) -> None:
        super().__init__()
        if sam2.num_maskmem < 1:
            raise ValueError("Sam2Parts needs a SAM2 model with memory (num_maskmem >= 1)")
        self.image_encoder = sam2.image_encoder
        self.memory_encoder = sam2.memory_encoder
        self.memory_attention = sam2.memory_attention
        self.sam_prompt_encoder = sam2.sam_prompt_encoder
        self.sam_mask_decoder = sam2.sam_mask_decoder
        self.maskmem_tpos_enc = sam2.maskmem_tpos_enc
        self.no_mem_embed = sam2.no_mem_embed
        self.no_obj_embed_spatial = sam2.no_obj_embed_spatial
        self.image_size = sam2.image_size
        self.use_high_res_features = sam2.use_high_res_features_in_sam
        self.sigmoid_scale_for_mem_enc = sam2.sigmoid_scale_for_mem_enc
        self.sigmoid_bias_for_mem_enc = sam2.sigmoid_bias_for_mem_enc
        self.register_buffer("pixel_mean", torch.tensor(SAM2_IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM2_IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def prompt_embed_dim(self) -> int:
        """Width of the prompt tokens and of the image embedding (256 for the published SAM2 models)."""
        return self.sam_prompt_encoder.embed_dim

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """Run the image encoder, as ``SAM2Base.forward_image``.

        Args:
            images: ``[B, 3, S, S]`` or ``[B, 1, S, S]`` (grey, repeated to RGB) intensities in [0, 1], ``S`` being
                ``image_size``; normalised here with SAM2's ImageNet statistics.

        Returns:
            a dict with ``image_embedding`` (top-level feature, ``[B, C, S/16, S/16]``), ``image_pos`` (its sine
            positional encoding, same shape), ``high_res_features`` (the stride-4 and stride-8 features already
            projected by the mask decoder's ``conv_s0`` / ``conv_s1``, ``[B, C/8, S/4, S/4]`` and
            ``[B, C/4, S/8, S/8]``; ``None`` when the model does not use them) and ``pooled`` (the global average of
            the top-level feature, ``[B, C]``, the template bank's default embedding).
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {list(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this SAM2 model takes {self.image_size}x{self.image_size} images, got {list(images.shape[-2:])}"
            )
        images = images.expand(-1, 3, -1, -1)
        backbone = self.image_encoder((images - self.pixel_mean) / self.pixel_std)
        levels = backbone["backbone_fpn"]
        embedding = levels[-1]
        high_res_features = None
        if self.use_high_res_features:
            high_res_features = [self.sam_mask_decoder.conv_s0(levels[0]), self.sam_mask_decoder.conv_s1(levels[1])]
        return {
            "image_embedding": embedding,
            "image_pos": backbone["vision_pos_enc"][-1],
            "high_res_features": high_res_features,
            "pooled": embedding.mean(dim=(2, 3)),
        }

    def encode_memory(
        self, template_features: torch.Tensor, template_masks: torch.Tensor, masks_are_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a template's features and mask into a memory, as ``SAM2Base._encode_new_memory``.

        The mask probability is scaled and shifted (``sigmoid_scale_for_mem_enc``, ``sigmoid_bias_for_mem_enc``: x20,
        -10 in SAM2.1, i.e. back to logit-like values) before the memory encoder; an empty template mask adds SAM2's
        learned no-object embedding to the memory.

        Args:
            template_features: the template's ``image_embedding`` from :meth:`encode_image`, ``[B, C, S/16, S/16]``.
            template_masks: ``[B, 1, H, W]`` mask of the class on the template: binary (or probabilities), or logits
                when ``masks_are_logits``; resized to the image size when it differs.
            masks_are_logits: whether ``template_masks`` are logits (a sigmoid is applied first).

        Returns:
            ``(memory, memory_pos)``: the memory features ``[B, C_mem, S/16, S/16]`` and their spatial positional
            encoding (same shape).
        """
        masks = _resize_mask(template_masks, (self.image_size, self.image_size))
        probabilities = torch.sigmoid(masks) if masks_are_logits else masks
        mask_for_memory = probabilities * self.sigmoid_scale_for_mem_enc + self.sigmoid_bias_for_mem_enc
        encoded = self.memory_encoder(template_features, mask_for_memory, skip_mask_sigmoid=True)
        memory = encoded["vision_features"]
        if self.no_obj_embed_spatial is not None:
            object_absent = (probabilities.flatten(1) <= 0.5).all(dim=1).to(memory.dtype)
            memory = memory + object_absent.view(-1, 1, 1, 1) * self.no_obj_embed_spatial.view(1, -1, 1, 1)
        return memory, encoded["vision_pos_enc"][-1]

    def condition_on_memory(
        self, target_features: torch.Tensor, memory: torch.Tensor | None, memory_pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Condition the target's features on a template memory, as ``SAM2Base._prepare_memory_conditioned_features``.

        The template is a conditioning frame: its memory gets the temporal encoding of temporal position 0.

        Args:
            target_features: the target's ``image_embedding`` from :meth:`encode_image`, ``[B, C, h, w]``.
            memory: ``memory`` from :meth:`encode_memory`, ``[B, C_mem, h, w]``; ``None`` adds the learned no-memory
                embedding instead.
            memory_pos: the memory's positional encoding from :meth:`encode_memory` (needed with ``memory``).

        Returns:
            the conditioned features, ``[B, C, h, w]``.
        """
        batch, channels, height, width = target_features.shape
        if memory is None:
            return target_features + self.no_mem_embed.view(1, channels, 1, 1)
        if memory_pos is None:
            raise ValueError("memory_pos is required with memory")
        target_pos = self.image_encoder.neck.position_encoding(target_features).to(target_features.dtype)
        # SAM2's attention modules take (sequence, batch, channels) sequences.
        target_tokens = target_features.flatten(2).permute(2, 0, 1)
        target_pos_tokens = target_pos.flatten(2).permute(2, 0, 1)
        memory_tokens = memory.flatten(2).permute(2, 0, 1)
        conditioning_frame_tpos = self.maskmem_tpos_enc[-1]  # index num_maskmem - t_pos - 1 with t_pos = 0
        memory_pos_tokens = memory_pos.flatten(2).permute(2, 0, 1) + conditioning_frame_tpos
        conditioned = self.memory_attention(
            curr=[target_tokens], curr_pos=[target_pos_tokens], memory=memory_tokens, memory_pos=memory_pos_tokens
        )
        return conditioned.permute(1, 2, 0).reshape(batch, channels, height, width)

    def decode_masks(
        self,
        image_embedding: torch.Tensor,
        high_res_features: Sequence[torch.Tensor] | None,
        prompt_tokens: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Predict one mask per sample with the prompt encoder and mask decoder, as ``SAM2Base._forward_sam_heads``.

        Args:
            image_embedding: the (memory-conditioned) features, ``[B, C, S/16, S/16]``.
            high_res_features: ``high_res_features`` from :meth:`encode_image` of the same images.
            prompt_tokens: ``[B, N, C]`` extra sparse prompt tokens (VESSA's projected ``<SEG>`` embedding), appended
                after the prompt encoder's point / box tokens.
            boxes: ``[B, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels of the ``S x S`` image.
            points: ``(coords [B, P, 2] as (x, y) pixels, labels [B, P])``, label 1 foreground, 0 background,
                -1 padding. Without points and boxes SAM2's empty padding point is used.
            mask_prompt: ``[B, 1, S/4, S/4]`` mask logits as a dense prompt (resized when of another size).

        Returns:
            a dict with ``low_res_logits`` ``[B, 1, S/4, S/4]``, ``logits`` (bilinearly upsampled, ``[B, 1, S, S]``),
            ``iou`` (predicted IoU, ``[B, 1]``) and ``object_score_logits`` (whether the object is present, ``[B, 1]``).
        """
        batch = image_embedding.shape[0]
        if points is None and boxes is None:
            points = (
                torch.zeros(batch, 1, 2, device=image_embedding.device),
                -torch.ones(batch, 1, dtype=torch.int32, device=image_embedding.device),
            )
        if mask_prompt is not None:
            mask_prompt = _resize_mask(mask_prompt, self.sam_prompt_encoder.mask_input_size)
        sparse, dense = self.sam_prompt_encoder(points=points, boxes=boxes, masks=mask_prompt)
        if prompt_tokens is not None:
            sparse = torch.cat([sparse, prompt_tokens.to(sparse.dtype)], dim=1)
        low_res_logits, iou, _, object_score_logits = self.sam_mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=high_res_features,
        )
        low_res_logits = low_res_logits.float()
        logits = F.interpolate(
            low_res_logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        return {
            "low_res_logits": low_res_logits,
            "logits": logits,
            "iou": iou,
            "object_score_logits": object_score_logits,
        }
