"""VESSA, the reference-guided segmentation assistant: a template (image + mask of the class) is written into a SAM2
memory that conditions the target's features, and a Qwen3-VL ``<SEG>`` embedding of (target, template overlay, text)
is the sparse prompt of SAM2's mask decoder. Optional dense (mask) and box prompts carry Stage 2's student feedback."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..templates.bank import TemplateBank
from ..templates.prompt import DEFAULT_PROMPT_TEMPLATE, build_prompt
from ..transforms.overlay import TemplateOverlay
from .sam2_parts import SAM2_DEFAULT_CONFIG, Sam2Parts, build_sam2_model
from .vlm import Qwen3VLPrompter

__all__ = [
    "VESSA_ENCODER_NAME",
    "VessaModel",
    "VessaSegmenter",
    "boxes_from_masks",
    "build_vessa_model",
    "feedback_prompts",
]

#: encoder name a template bank records for :meth:`VessaModel.embed_images` (SAM2's pooled top-level feature)
VESSA_ENCODER_NAME = "vessa_sam2_pooled"


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


#: prompts are logits; a probability of exactly 0 or 1 would give an infinite one
MAX_PROMPT_LOGIT = 10.0


def feedback_prompts(probabilities: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VESSA's prompts from another model's opinion of one class per sample (Stage 2's student feedback, or Stage 1's
    simulation of it): a dense prompt, the probabilities ``[N, 1, S, S]`` as logits clamped to
    ``+-MAX_PROMPT_LOGIT``, and a box ``[N, 4]`` around the binary ``masks`` ``[N, 1, S, S]`` (the whole image where a
    mask is empty, which tells SAM2 nothing about where the class is)."""
    mask_logits = torch.logit(probabilities, eps=1e-6).clamp(-MAX_PROMPT_LOGIT, MAX_PROMPT_LOGIT)
    box, present = boxes_from_masks(masks)
    height, width = masks.shape[-2:]
    whole = torch.tensor([0.0, 0.0, float(width), float(height)], device=box.device)
    return mask_logits, torch.where(present[:, None], box, whole)


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

    The state dict leaves out the frozen parameters of a VLM loaded from a checkpoint (``prompter.vlm_path``): they are
    what that checkpoint holds (gigabytes for Qwen3-VL-2B), so the saved VESSA weights stay small and loading them
    back accepts their absence. A tiny random VLM (no ``vlm_path``) is always saved: nothing else could restore it.
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
        self.register_state_dict_post_hook(_drop_pretrained_frozen_vlm)
        self.register_load_state_dict_post_hook(_allow_missing_pretrained_frozen_vlm)

    @property
    def image_size(self) -> int:
        return self.sam2.image_size

    def pretrained_frozen_vlm_keys(self) -> set[str]:
        """State-dict keys (relative to this module) of the VLM entries that a checkpoint directory restores: every
        parameter and buffer of a VLM loaded from ``vlm_path`` except the trained ones (LoRA adapters, ``full``)."""
        vlm = self.prompter.vlm
        if vlm is None or not self.prompter.vlm_path:
            return set()
        trained = {name for name, p in vlm.named_parameters() if p.requires_grad}
        return {f"prompter.vlm.{name}" for name in vlm.state_dict(keep_vars=True) if name not in trained}

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Template-bank embeddings: SAM2's pooled top-level image feature, ``[B, 1, H, W]`` in [0, 1] -> ``[B, C]``.

        Images of another size are resized (bilinear) to ``image_size``; gradients are never recorded.
        """
        device = next(self.sam2.parameters()).device
        images = images.to(device=device, dtype=torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.sam2.encode_image(images)["pooled"]

    def forward(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        class_indices: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        modalities: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Mask logits of one class per sample.

        Args:
            images: target slices ``[B, 1, S, S]`` in [0, 1], ``S`` = ``image_size``.
            template_images: matched templates ``[B, 1, S, S]`` in [0, 1].
            template_masks: binary masks of the class on the templates ``[B, 1, S, S]``.
            class_indices: ``[B]`` indices into ``class_names``.
            mask_prompts: optional dense prompt, ``[B, 1, S, S]`` (or ``S/4``) logits, e.g. the student's prediction.
            boxes: optional ``[B, 4]`` ``(x0, y0, x1, y1)`` pixel boxes.
            modalities: the modality named in each sample's prompt (several data sets in one batch); default
                ``modality`` for all.

        Returns:
            ``logits`` ``[B, 1, S, S]``, ``low_res_logits``, ``iou``, ``object_score_logits`` and the VLM's ``lm_loss``
            (``None`` without a VLM).
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VESSA takes {self.image_size} x {self.image_size} slices, got {tuple(images.shape[-2:])}")
        if modalities is None:
            modalities = [self.modality] * len(class_indices)
        elif len(modalities) != len(class_indices):
            raise ValueError(f"need one modality per sample, got {len(modalities)} for {len(class_indices)} samples")
        texts = [
            build_prompt(self.class_names[int(c)], m, self.prompt_template)
            for c, m in zip(class_indices.tolist(), modalities)
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

    def class_logits(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        class_indices: Sequence[int] | None = None,
        modality: str | None = None,
    ) -> torch.Tensor:
        """Per-class mask logits ``[B, C, S, S]`` for all classes at once (classes run as one batch); the arguments
        are those of :meth:`segment_classes`."""
        b, c = template_images.shape[:2]
        flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
        classes = torch.arange(c) if class_indices is None else torch.as_tensor(list(class_indices))
        if len(classes) != c:
            raise ValueError(f"{len(classes)} class indices for templates of {c} classes")
        modalities = [modality or self.modality] * (b * c)
        out = self.forward(
            images.repeat_interleave(c, dim=0), flat(template_images), flat(template_masks),
            classes.to(images.device).repeat(b), flat(mask_prompts), flat(boxes), modalities,
        )
        return out["logits"].view(b, c, *images.shape[-2:])

    @staticmethod
    def probabilities(class_logits: torch.Tensor) -> torch.Tensor:
        """``[B, C+1, S, S]`` probabilities from per-class logits ``[B, C, S, S]``: sigmoid foreground, background
        ``1 - max`` of the foreground."""
        foreground = torch.sigmoid(class_logits)
        background = 1.0 - foreground.amax(dim=1, keepdim=True)
        return torch.cat((background, foreground), dim=1)

    def segment_classes(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        class_indices: Sequence[int] | None = None,
        modality: str | None = None,
    ) -> torch.Tensor:
        """(C+1)-channel probabilities ``[B, C+1, S, S]`` for all classes at once (classes run as one batch).

        Args:
            images: ``[B, 1, S, S]``.
            template_images, template_masks: ``[B, C, 1, S, S]``, one matched template per image and class.
            mask_prompts: optional ``[B, C, 1, S, S]`` logits; boxes: optional ``[B, C, 4]``.
            class_indices: the ``C`` classes (indices into ``class_names``) in channel order; default all of them.
            modality: the modality named in the prompts; default ``modality``.

        The background probability is ``1 - max`` of the foreground probabilities, so a pixel is foreground only when
        some class is more likely than not.
        """
        return self.probabilities(
            self.class_logits(images, template_images, template_masks, mask_prompts, boxes, class_indices, modality)
        )

    @torch.no_grad()
    def pseudo_label(
        self,
        images: torch.Tensor,
        template_images: torch.Tensor,
        template_masks: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        box_prompts: torch.Tensor | None = None,
        class_indices: Sequence[int] | None = None,
        modality: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``[B, S, S]`` (0 background, 1..C classes) and their confidences for Stage 2's unlabelled slices.

        ``mask_prompts`` (``[B, C, 1, S, S]`` logits) and ``box_prompts`` (``[B, C, 4]``) carry the student's feedback;
        ``class_indices`` and ``modality`` are as in :meth:`segment_classes`.
        """
        probabilities = self.segment_classes(
            images, template_images, template_masks, mask_prompts, box_prompts, class_indices, modality
        )
        confidence, labels = probabilities.max(dim=1)
        return labels, confidence


def _drop_pretrained_frozen_vlm(module: VessaModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in module.pretrained_frozen_vlm_keys():
        state_dict.pop(prefix + key, None)


def _allow_missing_pretrained_frozen_vlm(module: VessaModel, incompatible_keys) -> None:
    restored = module.pretrained_frozen_vlm_keys()
    if restored:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not any(k == r or k.endswith("." + r) for r in restored)]


def build_vessa_model(
    class_names: Sequence[str],
    modality: str = "MRI",
    vlm_path: str | os.PathLike | None = None,
    train_vlm: str = "frozen",
    sam2_config: str = SAM2_DEFAULT_CONFIG,
    sam2_ckpt: str | os.PathLike | None = None,
    sam2_preset: str = "tiny_cpu",
    image_size: int | None = None,
    train_image_encoder: bool = True,
    freeze_vision_tower: bool = True,
    lora_rank: int = 8,
    vlm_dtype: str | None = None,
    vlm_max_image_pixels: int | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    gated_vlm_prompt: bool = True,
) -> VessaModel:
    """Build VESSA from its bundle's top-level settings: SAM2 parts, the Qwen3-VL prompter and the model around them.

    Args:
        class_names: the foreground classes VESSA is prompted with (e.g. ``TemplateBank.foreground_classes()``).
        modality: default modality named in the prompts.
        vlm_path: local Qwen3-VL checkpoint directory (Hugging Face layout); empty builds the tiny random VLM.
        train_vlm: ``"frozen"``, ``"lora"``, ``"full"`` or ``"off"`` (see :class:`Qwen3VLPrompter`).
        sam2_config: SAM2 config inside the ``sam2`` package, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``.
        sam2_ckpt: SAM2 checkpoint in SAM2's format matching ``sam2_config`` and ``sam2_preset``; empty: random.
        sam2_preset: ``"tiny_cpu"`` (tiny widths, for CPU runs and tests) or ``"full"`` (the published architecture,
            what a real checkpoint needs).
        image_size: side in pixels of the square slices (a multiple of 32); ``None`` keeps the preset's.
        train_image_encoder: whether SAM2's image encoder trains (a random one must; a pretrained one is usually
            frozen, as in LISA).
        freeze_vision_tower, lora_rank: see :class:`Qwen3VLPrompter`.
        vlm_dtype: dtype of the VLM's weights (``"bfloat16"`` on GPUs); empty keeps float32.
        vlm_max_image_pixels: pixel budget of each image given to the VLM; empty keeps the image processor's.
        prompt_template: the reference text with ``{modality}`` and ``{class}`` fields.
        gated_vlm_prompt: the VLM's ``<SEG>`` prompt enters through a zero-initialised gate on top of a learned
            per-class prompt (see :class:`Qwen3VLPrompter`); ``False`` gives the paper's plain ``<SEG>`` prompt.

    Raises:
        ValueError: an image size the SAM2 encoder cannot take, a SAM2 checkpoint that does not match the model, an
            unknown ``train_vlm`` or preset.
        DataError: a ``vlm_path`` without the files of a Qwen3-VL checkpoint.
    """
    sam2 = Sam2Parts(
        build_sam2_model(sam2_config, checkpoint=sam2_ckpt or None, image_size=image_size or None, preset=sam2_preset)
    )
    sam2.image_encoder.requires_grad_(bool(train_image_encoder))
    prompter = Qwen3VLPrompter(
        vlm_path=vlm_path or None,
        train_vlm=train_vlm,
        out_dim=sam2.prompt_embed_dim,
        freeze_vision_tower=freeze_vision_tower,
        lora_rank=lora_rank,
        class_names=class_names,
        max_image_pixels=vlm_max_image_pixels or None,
        torch_dtype=vlm_dtype or None,
        gated_vlm_prompt=gated_vlm_prompt,
    )
    model = VessaModel(sam2, prompter, class_names, modality=modality, prompt_template=prompt_template)
    return model.train()


class VessaSegmenter(nn.Module):
    """Whole-slice segmentation of one data set's classes with VESSA and a template bank: the network an evaluator or
    a ``SliceInferer`` calls.

    For each slice and class the bank's best exemplar (of the data set, showing the class) is matched, and
    :meth:`VessaModel.segment_classes` turns slice + templates into ``[B, C+1, S, S]`` probabilities whose channels
    follow the data set's label values (background first). A bank embedded with :meth:`VessaModel.embed_images`
    (``VESSA_ENCODER_NAME``) matches with the model's current encoder.

    Args:
        model: the VESSA model (its ``class_names`` must include the data set's foreground classes).
        bank: the template bank.
        dataset: the data set whose classes are segmented; default the bank's first.

    Raises:
        ValueError: an unknown data set, or a class of it the model was not built for.
    """

    def __init__(self, model: VessaModel, bank: TemplateBank, dataset: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.bank = bank
        self.dataset = bank.datasets()[0] if dataset is None else dataset
        self.class_names = bank.classes(self.dataset)
        missing = [c for c in self.class_names[1:] if c not in model.class_names]
        if missing:
            raise ValueError(
                f"classes {missing} of data set '{self.dataset}' are not among the model's classes {model.class_names}"
            )
        self.class_indices = [model.class_names.index(c) for c in self.class_names[1:]]
        self.modality = bank.modality(self.dataset)

    def match_templates(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best exemplar of each class for each slice: template images and masks ``[B, C, 1, S, S]``."""
        embed_fn = self.model.embed_images if self.bank.encoder_name == VESSA_ENCODER_NAME else None
        queries = images.detach().float().clamp(0.0, 1.0).cpu()
        per_class = [
            self.bank.match_batch(queries, name, k=1, dataset=self.dataset, embed_fn=embed_fn)
            for name in self.class_names[1:]
        ]
        size = (self.model.image_size, self.model.image_size)
        template_images = torch.stack([torch.stack([m[0].image for m in matches]) for matches in per_class], dim=1)
        template_masks = torch.stack([torch.stack([m[0].mask for m in matches]) for matches in per_class], dim=1)
        if template_images.shape[-2:] != size:
            flat_images, flat_masks = template_images.flatten(0, 1), template_masks.flatten(0, 1)
            template_images = F.interpolate(flat_images, size, mode="bilinear", align_corners=False).unflatten(
                0, template_images.shape[:2]
            )
            template_masks = F.interpolate(flat_masks, size, mode="nearest").unflatten(0, template_masks.shape[:2])
        return template_images.to(images.device), template_masks.to(images.device)

    def forward(
        self,
        images: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        box_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, 1, S, S]`` slices in [0, 1] -> ``[B, C+1, S, S]`` probabilities (see :meth:`VessaModel.segment_classes`
        for the optional prompts)."""
        return self.model.probabilities(self.class_logits(images, mask_prompts, box_prompts))

    def class_logits(
        self,
        images: torch.Tensor,
        mask_prompts: torch.Tensor | None = None,
        box_prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-class mask logits ``[B, C, S, S]`` (channel ``c`` is the data set's class ``c + 1``) with the matched
        templates: what :meth:`forward` turns into probabilities, and what fine-tuning VESSA differentiates."""
        template_images, template_masks = self.match_templates(images)
        return self.model.class_logits(
            images, template_images, template_masks, mask_prompts, box_prompts, self.class_indices, self.modality
        )
