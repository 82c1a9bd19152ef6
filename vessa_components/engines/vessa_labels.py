"""VESSA as a pseudo-label source of Stage 2, with a per-slice cache so that VESSA does not run on every iteration.

Pseudo-labels are computed on each unlabelled slice's reference grid (the resized slice before random augmentation)
and kept, keyed by the slice's id, until they are ``refresh_interval`` iterations old. The trainer resamples them onto
the augmented weak view with :func:`vessa_components.transforms.warp_to_view`, so one VESSA pass serves every
augmentation of the slice. From ``feedback_start`` on, the EMA teacher's prediction on the slice is given to VESSA as a
dense mask prompt and a box per class, and entries made without that feedback count as stale.

With ``mutual_learning``, VESSA learns back from the teacher: every ``mutual_learning_interval`` iterations one AdamW
step fine-tunes its mask decoder (nothing else) on the teacher's confident pseudo-labels of the unlabelled slices
(:meth:`VessaPseudoLabeler.learn_from_teacher`); the step empties the cache, whose labels came from the old decoder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.errors import DataError
from ..losses.vessa import VessaMaskLoss
from ..networks.vessa import VessaSegmenter, build_vessa_model, feedback_prompts
from ..templates.bank import TemplateBank

__all__ = ["VessaPseudoLabeler", "build_vessa_labeler"]

#: logit given to the pixels mutual learning leaves out (target 0): sigmoid 0 and BCE 0, so they add nothing
_IGNORED_LOGIT = -1.0e4


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (``flag`` itself outside a distributed run)."""
    if _world_size() == 1:
        return flag
    value = torch.tensor([float(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _average_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over the ranks (a missing one counts as zero), so that every rank takes the
    same optimiser step and the ranks' copies of VESSA stay identical."""
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= _world_size()


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
        mutual_learning: fine-tune VESSA's mask decoder on the teacher's confident pseudo-labels (see
            :meth:`learn_from_teacher`); the segmenter must then be a :class:`VessaSegmenter` (``class_logits`` and
            ``model.sam2.sam_mask_decoder``).
        mutual_learning_interval: iterations between two fine-tuning steps (:meth:`mutual_learning_due`).
        mutual_learning_lr: AdamW learning rate of the mask decoder.
        mutual_learning_conf_thresh: teacher confidence (max softmax probability) from which a pixel counts in the
            fine-tuning loss.

    Attributes:
        hits, misses: cache lookups served from the cache and computed anew since construction.
        mutual_learning_steps: fine-tuning steps taken (restored by :meth:`load_state_dict`).

    :meth:`state_dict` / :meth:`load_state_dict` hold the mask decoder's weights and its optimiser's state, so a
    training checkpoint resumes the fine-tuned VESSA; the cache is not saved.
    """

    def __init__(
        self,
        segmenter: nn.Module,
        refresh_interval: int = 200,
        feedback_start: int | None = None,
        feedback_boxes: bool = True,
        mutual_learning: bool = False,
        mutual_learning_interval: int = 50,
        mutual_learning_lr: float = 1e-4,
        mutual_learning_conf_thresh: float = 0.95,
    ) -> None:
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        if int(mutual_learning_interval) != mutual_learning_interval or mutual_learning_interval < 1:
            raise ValueError(f"mutual_learning_interval must be an integer >= 1, got {mutual_learning_interval}")
        if not mutual_learning_lr > 0:
            raise ValueError(f"mutual_learning_lr must be > 0, got {mutual_learning_lr}")
        if not 0.0 <= mutual_learning_conf_thresh <= 1.0:
            raise ValueError(f"mutual_learning_conf_thresh must be in [0, 1], got {mutual_learning_conf_thresh}")
        self.segmenter = segmenter.requires_grad_(False).eval()
        if mutual_learning and (
            not callable(getattr(segmenter, "class_logits", None)) or _mask_decoder(segmenter) is None
        ):
            raise ValueError(
                f"mutual_learning needs a VessaSegmenter (class_logits and model.sam2.sam_mask_decoder), got "
                f"{type(segmenter).__name__}"
            )
        self.refresh_interval = refresh_interval
        self.feedback_start = feedback_start
        self.feedback_boxes = feedback_boxes
        self.mutual_learning = bool(mutual_learning)
        self.mutual_learning_interval = int(mutual_learning_interval)
        self.mutual_learning_lr = float(mutual_learning_lr)
        self.mutual_learning_conf_thresh = float(mutual_learning_conf_thresh)
        self.mutual_learning_steps = 0
        self._optimizer: torch.optim.Optimizer | None = None  # created by the first step (or load_state_dict)
        self._mask_loss = VessaMaskLoss()
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

    def _to_vessa_size(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B, K, H, W]`` as float, bilinearly resized to VESSA's input size (``segmenter.model.image_size``)
        when it has one and it differs."""
        side = getattr(getattr(self.segmenter, "model", None), "image_size", None)
        t = t.float()
        return t if side is None or t.shape[-2:] == (side, side) else F.interpolate(t, (side, side), mode="bilinear")

    def _prompts(self, teacher_probs: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """VESSA's feedback prompts from the teacher's probabilities on VESSA's grid ``[B, C+1, S, S]``: mask logits
        ``[B, C, 1, S, S]`` and, with ``feedback_boxes``, boxes ``[B, C, 4]``; ``(None, None)`` without a teacher."""
        if teacher_probs is None:
            return None, None
        b, c, size = teacher_probs.shape[0], teacher_probs.shape[1] - 1, teacher_probs.shape[-2:]
        foreground = teacher_probs[:, 1:].reshape(b * c, 1, *size)
        hard = F.one_hot(teacher_probs.argmax(1), c + 1)[..., 1:].permute(0, 3, 1, 2).reshape(b * c, 1, *size).float()
        mask_prompts, boxes = feedback_prompts(foreground, hard)
        mask_prompts = mask_prompts.view(b, c, 1, *size)
        return (mask_prompts, boxes.view(b, c, 4)) if self.feedback_boxes else (mask_prompts, None)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
        """VESSA's ``[B, C+1, H, W]`` probabilities for slices ``[B, 1, H, W]`` in [0, 1], prompted with the teacher's
        ``[B, C+1, H, W]`` probabilities when given."""
        size = images.shape[-2:]
        x = self._to_vessa_size(images.clamp(0.0, 1.0))
        mask_prompts, boxes = self._prompts(None if teacher_probs is None else self._to_vessa_size(teacher_probs))
        self.segmenter.eval()
        probs = self.segmenter(x, mask_prompts, boxes).float()
        return probs if probs.shape[-2:] == size else F.interpolate(probs, size, mode="bilinear")

    def invalidate(self) -> None:
        """Drop every cached pseudo-label (VESSA changed: they are recomputed at their next lookup)."""
        self._cache.clear()

    def mutual_learning_due(self, iteration: int) -> bool:
        """Whether :meth:`learn_from_teacher` is due at ``iteration``: ``mutual_learning`` is on and the iteration is
        a multiple of ``mutual_learning_interval``."""
        return self.mutual_learning and iteration > 0 and iteration % self.mutual_learning_interval == 0

    def _decoder(self) -> nn.Module:
        decoder = _mask_decoder(self.segmenter)
        if decoder is None:
            raise ValueError(f"{type(self.segmenter).__name__} has no model.sam2.sam_mask_decoder to fine-tune")
        return decoder

    def _decoder_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self._decoder().parameters(), lr=self.mutual_learning_lr)
        return self._optimizer

    def learn_from_teacher(
        self,
        images: torch.Tensor,
        teacher_probs: torch.Tensor,
        conf_thresh: float | None = None,
        iteration: int | None = None,
    ) -> dict[str, float]:
        """One AdamW step of VESSA's mask decoder (the rest of VESSA stays frozen) towards the teacher's labels.

        Each class's target is the binary mask ``teacher_argmax == class``; the loss is :class:`VessaMaskLoss`'s
        BCE + Dice on the per-class logits, counted only on the pixels where the teacher's confidence (its max
        probability) reaches ``conf_thresh``: BCE summed there and divided by all pixels, Dice over those pixels only.
        The templates are matched as in :meth:`VessaSegmenter.forward`, and the teacher's prediction is VESSA's
        prompt when :meth:`feedback_active` at ``iteration`` (never when ``iteration`` is ``None``), as in
        :meth:`__call__`. A step empties the cache; without a confident pixel no step is taken. In a distributed run the
        ranks' gradients are averaged before the step (a rank without a confident pixel adds zeros), so that the ranks'
        copies of VESSA stay identical; the step is skipped only when no rank has a confident pixel.

        Args:
            images: ``[B, 1, H, W]`` reference-grid unlabelled slices in [0, 1].
            teacher_probs: ``[B, C+1, H, W]`` softmax probabilities of the EMA teacher on them.
            conf_thresh: default ``mutual_learning_conf_thresh``.
            iteration: the trainer's iteration (switches the feedback prompts on).

        Returns:
            ``loss_ml`` (the loss before the step; 0 when no step was taken) and ``kept_share`` (share of the pixels
            that counted).
        """
        conf_thresh = self.mutual_learning_conf_thresh if conf_thresh is None else float(conf_thresh)
        if teacher_probs.shape[0] != images.shape[0] or teacher_probs.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"teacher_probs {tuple(teacher_probs.shape)} must be [B, C+1, H, W] for images {tuple(images.shape)}"
            )
        teacher = self._to_vessa_size(teacher_probs)
        confidence, labels = teacher.max(dim=1)
        keep = confidence >= conf_thresh  # [B, S, S]
        kept_share = float(keep.float().mean())
        any_kept = bool(keep.any())
        if not _any_rank(any_kept):  # every rank steps, or none: the gradient all-reduce below needs them all
            return {"loss_ml": 0.0, "kept_share": 0.0}
        num_classes = teacher.shape[1] - 1
        targets = F.one_hot(labels, num_classes + 1)[..., 1:].permute(0, 3, 1, 2).float()  # [B, C, S, S]
        feedback = iteration is not None and self.feedback_active(iteration)
        mask_prompts, boxes = self._prompts(teacher if feedback else None)
        decoder, optimizer = self._decoder(), self._decoder_optimizer()
        self.segmenter.eval()
        decoder.requires_grad_(True)
        loss = torch.zeros(())
        try:
            optimizer.zero_grad(set_to_none=True)
            if any_kept:
                with torch.enable_grad():
                    logits = self.segmenter.class_logits(self._to_vessa_size(images.clamp(0.0, 1.0)), mask_prompts, boxes)
                    if logits.shape != targets.shape:
                        raise ValueError(f"VESSA segments {logits.shape[1]} classes, the teacher {num_classes}")
                    kept = keep.unsqueeze(1).expand_as(logits)
                    logits = torch.where(kept, logits.float(), torch.full_like(logits, _IGNORED_LOGIT))
                    loss = self._mask_loss(logits.flatten(0, 1)[:, None], (targets * kept).flatten(0, 1)[:, None])["loss"]
                loss.backward()
            if _world_size() > 1:
                _average_gradients(decoder)
            optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            decoder.requires_grad_(False)
        self.mutual_learning_steps += 1
        self.invalidate()
        return {"loss_ml": float(loss.detach()), "kept_share": kept_share}

    def state_dict(self) -> dict:
        """The mask decoder's weights, its optimiser's state (``None`` before the first step) and the step count."""
        return {
            "mask_decoder": self._decoder().state_dict(),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "mutual_learning_steps": self.mutual_learning_steps,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` saved; the cache, made by the previous decoder, is emptied."""
        self._decoder().load_state_dict(state["mask_decoder"])
        if state.get("optimizer") is not None:
            self._decoder_optimizer().load_state_dict(state["optimizer"])
        self.mutual_learning_steps = int(state.get("mutual_learning_steps", 0))
        self.invalidate()

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


def _mask_decoder(segmenter: nn.Module) -> nn.Module | None:
    """SAM2's mask decoder inside a :class:`VessaSegmenter` (``None`` for another segmenter)."""
    decoder = getattr(getattr(getattr(segmenter, "model", None), "sam2", None), "sam_mask_decoder", None)
    return decoder if isinstance(decoder, nn.Module) else None


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
    mutual_learning: bool = False,
    mutual_learning_interval: int = 50,
    mutual_learning_lr: float = 1e-4,
    mutual_learning_conf_thresh: float = 0.95,
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
        mutual_learning, mutual_learning_interval, mutual_learning_lr, mutual_learning_conf_thresh: fine-tuning of
            VESSA's mask decoder on the teacher's confident pseudo-labels, see :class:`VessaPseudoLabeler`.

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
    return VessaPseudoLabeler(
        segmenter,
        refresh_interval=refresh_interval,
        feedback_start=feedback_start,
        mutual_learning=mutual_learning,
        mutual_learning_interval=mutual_learning_interval,
        mutual_learning_lr=mutual_learning_lr,
        mutual_learning_conf_thresh=mutual_learning_conf_thresh,
    )
