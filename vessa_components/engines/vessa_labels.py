"""VESSA as a pseudo-label source of Stage 2, with a per-slice cache so that VESSA does not run on every iteration.

Pseudo-labels are computed on each unlabelled slice's reference grid (the resized slice before random augmentation)
and kept, keyed by the slice's id, until they are ``refresh_interval`` iterations old. The trainer resamples them onto
the augmented weak view with :func:`vessa_components.transforms.warp_to_view`, so one VESSA pass serves every
augmentation of the slice. From ``feedback_start`` on, the EMA teacher's prediction on the slice is given to VESSA as a
dense mask prompt and a box per class, and entries made without that feedback count as stale.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.errors import DataError
from ..networks.vessa import VessaSegmenter, boxes_from_masks, build_vessa_model
from ..templates.bank import TemplateBank

__all__ = ["VessaPseudoLabeler", "build_vessa_labeler"]

#: prompts are logits; a teacher probability of exactly 0 or 1 would give an infinite one
_MAX_PROMPT_LOGIT = 10.0


class VessaPseudoLabeler:
    """Cached VESSA pseudo-labels for unlabelled slices.

    Args:
        segmenter: a frozen VESSA segmenter, ``([B, 1, S, S] slices in [0, 1], mask_prompts, box_prompts) ->
            [B, C+1, S, S]`` probabilities (e.g. :class:`vessa_components.networks.VessaSegmenter`); its own input size
            is read from ``segmenter.model.image_size`` when present and slices are resized to it and back.
        refresh_interval: iterations after which a cached pseudo-label is recomputed.
        feedback_start: iteration from which the teacher's prediction is fed to VESSA as prompts; ``None`` never
            (the ``vessa_no_feedback`` ablation).
        feedback_boxes: also give a box per class (the tight box of the teacher's mask; the whole slice when the
            teacher sees none of the class).

    Attributes:
        hits, misses: cache lookups served from the cache and computed anew since construction.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        refresh_interval: int = 200,
        feedback_start: int | None = None,
        feedback_boxes: bool = True,
    ) -> None:
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        self.segmenter = segmenter.requires_grad_(False).eval()
        self.refresh_interval = refresh_interval
        self.feedback_start = feedback_start
        self.feedback_boxes = feedback_boxes
        self.hits = 0
        self.misses = 0
        # id -> (iteration computed, with feedback, labels uint8 [H, W], confidence float16 [H, W])
        self._cache: dict[str, tuple[int, bool, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def feedback_active(self, iteration: int) -> bool:
        return self.feedback_start is not None and iteration >= self.feedback_start

    def _is_fresh(self, key: str, iteration: int) -> bool:
        entry = self._cache.get(key)
        if entry is None:
            return False
        computed_at, with_feedback, _, _ = entry
        if self.feedback_active(iteration) and not with_feedback:
            return False
        return iteration - computed_at < self.refresh_interval

    @torch.no_grad()
    def predict(self, images: torch.Tensor, teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
        """VESSA's ``[B, C+1, H, W]`` probabilities for slices ``[B, 1, H, W]`` in [0, 1], prompted with the teacher's
        ``[B, C+1, H, W]`` probabilities when given."""
        size = images.shape[-2:]
        model = getattr(self.segmenter, "model", None)
        side = getattr(model, "image_size", None)
        vessa_size = size if side is None else (side, side)
        resize = lambda t, mode: t if t.shape[-2:] == vessa_size else F.interpolate(t, vessa_size, mode=mode)  # noqa: E731
        x = resize(images.float().clamp(0.0, 1.0), "bilinear")
        mask_prompts = boxes = None
        if teacher_probs is not None:
            foreground = resize(teacher_probs[:, 1:].float(), "bilinear")
            logits = torch.logit(foreground, eps=1e-6).clamp(-_MAX_PROMPT_LOGIT, _MAX_PROMPT_LOGIT)
            mask_prompts = logits.unsqueeze(2)  # [B, C, 1, S, S]
            if self.feedback_boxes:
                b, c = foreground.shape[:2]
                hard = F.one_hot(resize(teacher_probs.float(), "bilinear").argmax(1), c + 1)[..., 1:]
                hard = hard.permute(0, 3, 1, 2).reshape(b * c, 1, *vessa_size).float()
                box, present = boxes_from_masks(hard)
                whole = torch.tensor([0.0, 0.0, vessa_size[1], vessa_size[0]], device=box.device)
                boxes = torch.where(present[:, None], box, whole).view(b, c, 4)
        self.segmenter.eval()
        probs = self.segmenter(x, mask_prompts, boxes).float()
        return probs if probs.shape[-2:] == size else F.interpolate(probs, size, mode="bilinear")

    @torch.no_grad()
    def __call__(
        self,
        ids: Sequence[str],
        images: torch.Tensor,
        iteration: int,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels ``[B, H, W]`` (long) and confidences ``[B, H, W]`` for slices on their reference grid.

        Args:
            ids: one id per slice (the cache key; the image path).
            images: ``[B, 1, H, W]`` reference-grid slices in [0, 1].
            iteration: the trainer's iteration (ages the cache, switches feedback on).
            teacher: ``[B, 1, H, W] -> [B, C+1, H, W]`` probabilities of the EMA teacher; run only on the slices that
                need VESSA, and only once feedback is active.
        """
        if len(ids) != images.shape[0]:
            raise ValueError(f"{len(ids)} ids for {images.shape[0]} slices")
        stale = [i for i, key in enumerate(ids) if not self._is_fresh(key, iteration)]
        self.hits += len(ids) - len(stale)
        self.misses += len(stale)
        if stale:
            subset = images[stale]
            feedback = self.feedback_active(iteration) and teacher is not None
            probs = self.predict(subset, teacher(subset).float() if feedback else None)
            confidence, labels = probs.max(dim=1)
            for row, i in enumerate(stale):
                self._cache[ids[i]] = (
                    iteration,
                    feedback,
                    labels[row].to("cpu", torch.uint8),
                    confidence[row].to("cpu", torch.float16),
                )
        entries = [self._cache[key] for key in ids]
        labels = torch.stack([e[2] for e in entries]).to(images.device, torch.long)
        confidence = torch.stack([e[3] for e in entries]).to(images.device, torch.float32)
        return labels, confidence


def build_vessa_labeler(
    method: str,
    vessa_ckpt: str | os.PathLike | None,
    template_bank: str | os.PathLike | None,
    labeled_data: Sequence[Mapping],
    class_names: Sequence[str],
    dataset_name: str,
    modality: str,
    vlm_path: str | os.PathLike | None = None,
    train_vlm: str = "frozen",
    sam2_config: str | None = None,
    sam2_preset: str = "tiny_cpu",
    image_size: int = 128,
    refresh_interval: int = 200,
    feedback_start: int | None = None,
    device: str | torch.device = "cpu",
) -> VessaPseudoLabeler | None:
    """The frozen VESSA of a ``vessa_foundation`` run as Stage 2's pseudo-labeler; ``None`` unless ``method`` is
    ``"vessa"`` (so a bundle config can always reference it).

    Args:
        method: the Stage-2 method.
        vessa_ckpt: ``models/model.pt`` of a ``vessa_foundation`` run (required for ``vessa``).
        template_bank: a saved :class:`TemplateBank` directory holding only this run's labelled cases; empty builds one
            from ``labeled_data`` (the slices' thumbnails as embeddings, the foundation bundle's default).
        labeled_data: the run's labelled datalist entries (``image``, ``label``, ``patient``).
        class_names: the bundle's class names, background first; the bank's must be the same.
        dataset_name, modality: the data set name the bank files the slices under, and the prompts' modality.
        vlm_path, train_vlm, sam2_config, sam2_preset, image_size: the ``vessa_foundation`` settings the checkpoint
            was trained with (a bank's own image size wins).
        refresh_interval, feedback_start: see :class:`VessaPseudoLabeler`.
        device: where VESSA runs.

    Raises:
        ValueError: a missing ``vessa_ckpt``, a bank whose classes differ from ``class_names`` or that holds
            unlabelled patients, a checkpoint that does not fit the configured model.
    """
    if method != "vessa":
        return None
    if not vessa_ckpt:
        raise ValueError("method=vessa needs vessa_ckpt: the models/model.pt of a vessa_foundation run")
    ckpt = Path(vessa_ckpt)
    if not ckpt.is_file():
        raise DataError(ckpt, "VESSA checkpoint not found (vessa_ckpt)")
    if template_bank:
        bank = TemplateBank.load(template_bank)
        if dataset_name not in bank.datasets():
            raise ValueError(f"template bank {template_bank} has no data set '{dataset_name}' (it has {bank.datasets()})")
        labeled_patients = {str(e.get("patient")) for e in labeled_data}
        extra = sorted({x.patient for x in bank.exemplars if x.dataset == dataset_name} - labeled_patients)
        if extra:
            raise ValueError(
                f"template bank {template_bank} holds patients {extra[:5]} that are not labelled in this run; "
                "a Stage-2 bank may only hold the run's labelled cases"
            )
    else:
        if not labeled_data:
            raise ValueError("method=vessa needs labelled slices to build its template bank")
        bank = TemplateBank.from_datalist(labeled_data, dataset_name, modality, class_names, image_size=image_size)
    if list(bank.classes(dataset_name)) != list(class_names):
        raise ValueError(
            f"template bank {template_bank or '(built from the labelled cases)'} has classes "
            f"{bank.classes(dataset_name)} for '{dataset_name}'; the bundle segments {list(class_names)}"
        )
    arch = {"sam2_config": sam2_config} if sam2_config else {}
    model = build_vessa_model(
        class_names[1:], modality, vlm_path or None, train_vlm, sam2_preset=sam2_preset, image_size=bank.image_size, **arch
    )
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first_lines = "; ".join(str(e).splitlines()[:3])
        raise ValueError(
            f"VESSA checkpoint {ckpt} does not fit the configured model (train_vlm={train_vlm}, sam2_preset="
            f"{sam2_preset}, image_size={bank.image_size}, classes {list(class_names[1:])}): {first_lines}"
        ) from e
    segmenter = VessaSegmenter(model.to(device), bank, dataset_name)
    return VessaPseudoLabeler(segmenter, refresh_interval=refresh_interval, feedback_start=feedback_start)
