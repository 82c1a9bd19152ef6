"""VESSA, the reference-guided segmentation assistant: a template (image + mask of the class) is written into a SAM2
memory that conditions the target's features, and a Qwen3-VL ``<SEG>`` embedding of (target, template overlay, text)
is the sparse prompt of SAM2's mask decoder. Optional dense (mask) and box prompts carry Stage 2's student feedback."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..templates.prompt import DEFAULT_PROMPT_TEMPLATE, build_prompt
from ..transforms.overlay import TemplateOverlay
from .sam2_parts import Sam2Parts
from .vlm import Qwen3VLPrompter

__all__ = ["VessaModel", "boxes_from_masks"]


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight ``(x0, y0, x1, y1)`` pixel boxes of binary masks ``[B, 1, H, W]`` and whether each mask is non-empty."""
    masks = masks[:, 0] > 0.5
    present = masks.flatten(1).any(dim=1)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    index_w = torch.arange(masks.shape[2], device=masks.device)
    index_h = torch.arange(masks.shape[1], device=masks.device)
    x0 = torch.where(cols, index_w, masks.shape[2]).amin(dim=1)
    x1 = torch.where(cols, index_w, -1).amax(dim=1)
    y0 = torch.where(rows, index_h, masks.shape[1]).amin(dim=1)
    y1 = torch.where(rows, index_h, -1).amax(dim=1)
    return torch.stack((x0, y0, x1 + 1, y1 + 1), dim=1).float(), present


class VessaModel(nn.Module):
    """Target slice + matched template (image, mask of class ``c``) + text -> mask logits of class ``c``.

    Args:
        sam2: the SAM2 parts (image encoder, memory encoder, memory attention, prompt encoder, mask decoder).
        prompter: the Qwen3-VL ``<SEG>`` prompter (``train_vlm="off"`` gives a learned class embedding instead); its
            ``out_dim`` must equal ``sam2.prompt_embed_dim``.
        class_names: foreground class names; ``class_indices`` index this list.
        modality: imaging modality named in the prompt text (``MRI``, ``CT``).
        prompt_template: the reference text with ``{modality}`` and ``{class}`` fields.
        overlay: renders the template with its mask for the VLM (default: red, half transparent, with contour).
    """

    def __init__(
        self,
        sam2: Sam2Parts,
        prompter: Qwen3VLPrompter,
        class_names: Sequence[str],
        modality: str = "MRI",
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        overlay: TemplateOverlay | None = None,
    ) -> None:
        super().__init__()
        if prompter.out_dim != sam2.prompt_embed_dim:
            raise ValueError(
                f"the prompter's out_dim ({prompter.out_dim}) must equal SAM2's prompt dimension ({sam2.prompt_embed_dim})"
            )
        self.sam2 = sam2
        self.prompter = prompter
        self.class_names = list(class_names)
        self.modality = modality
        self.prompt_template = prompt_template
        self.overlay = TemplateOverlay() if overlay is None else overlay

    @property
    def image_size(self) -> int:
        return self.sam2.image_size

    def forward(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        class_indices: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Mask logits of one class per sample.

        Args:
            images: target slices ``[B, 1, S, S]`` in [0, 1], ``S`` = ``image_size``.
            template_images: matched templates ``[B, 1, S, S]`` in [0, 1].
            template_masks: binary masks of the class on the templates ``[B, 1, S, S]``.
            class_indices: ``[B]`` indices into ``class_names``.
            mask_prompts: optional dense prompt, ``[B, 1, S, S]`` (or ``S/4``) logits, e.g. the student's prediction.
            boxes: optional ``[B, 4]`` ``(x0, y0, x1, y1)`` pixel boxes.

        Returns:
            ``logits`` ``[B, 1, S, S]``, ``low_res_logits``, ``iou``, ``object_score_logits`` and the VLM's ``lm_loss``
            (``None`` without a VLM).
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VESSA takes {self.image_size} x {self.image_size} slices, got {tuple(images.shape[-2:])}")
        texts = [
            build_prompt(self.class_names[int(c)], self.modality, self.prompt_template) for c in class_indices.tolist()
        ]
        overlays = torch.stack([self.overlay(t, m) for t, m in zip(template_images, template_masks)])
        prompt = self.prompter(images.expand(-1, 3, -1, -1), overlays.to(images), texts, class_indices)
        # target and template share one encoder pass
        encoded = self.sam2.encode_image(torch.cat((images, template_images)))
        embedding = encoded["image_embedding"]
        target_embedding, template_embedding = embedding.chunk(2)
        high_res = [f.chunk(2)[0] for f in encoded["high_res_features"]] if encoded["high_res_features"] else None
        memory, memory_pos = self.sam2.encode_memory(template_embedding, template_masks)
        conditioned = self.sam2.condition_on_memory(target_embedding, memory, memory_pos)
        decoded = self.sam2.decode_masks(
            conditioned, high_res, prompt_tokens=prompt.embeddings[:, None], boxes=boxes, mask_prompt=mask_prompts
        )
        return {**decoded, "lm_loss": prompt.lm_loss}

    def segment_classes(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(C+1)-channel probabilities ``[B, C+1, S, S]`` for all classes at once (classes run as one batch).

        Args:
            images: ``[B, 1, S, S]``.
            template_images, template_masks: ``[B, C, 1, S, S]``, one matched template per image and class.
            mask_prompts: optional ``[B, C, 1, S, S]`` logits; boxes: optional ``[B, C, 4]``.

        The background probability is ``1 - max`` of the foreground probabilities, so a pixel is foreground only when
        some class is more likely than not.
        """
        b, c = template_images.shape[:2]
        flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
        class_indices = torch.arange(c, device=images.device).repeat(b)
        out = self.forward(
            images.repeat_interleave(c, dim=0), flat(template_images), flat(template_masks), class_indices,
            flat(mask_prompts), flat(boxes),
        )
        foreground = torch.sigmoid(out["logits"]).view(b, c, *images.shape[-2:])
        background = 1.0 - foreground.amax(dim=1, keepdim=True)
        return torch.cat((background, foreground), dim=1)

    @torch.no_grad()
    def pseudo_label(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        box_prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``[B, S, S]`` (0 background, 1..C classes) and their confidences for Stage 2's unlabelled slices.

        ``mask_prompts`` (``[B, C, 1, S, S]`` logits) and ``box_prompts`` (``[B, C, 4]``) carry the student's feedback.
        """
        probabilities = self.segment_classes(images, template_images, template_masks, mask_prompts, box_prompts)
        confidence, labels = probabilities.max(dim=1)
        return labels, confidence
