"""VESSA's Stage-1 loss: ``w_bce * BCE + w_dice * Dice`` on each class mask ``+ w_ce * LM CE`` on the answer tokens.

The weights default to LISA's (2.0 BCE, 0.5 Dice, 1.0 language-model cross-entropy). Each mask counts once: BCE is
the mean over its pixels, Dice is computed per mask (MONAI's ``DiceLoss`` with a sigmoid) and both are averaged over
the masks of the batch. The language-model term only enters the loss when it carries a gradient, i.e. when the VLM
is trained (``train_vlm`` ``"lora"`` or ``"full"``); with a frozen VLM it is still reported, with no VLM it is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["VessaMaskLoss"]


class VessaMaskLoss(nn.Module):
    """Mask loss of VESSA's Stage-1 training.

    Args:
        w_bce: weight of the per-pixel binary cross-entropy.
        w_dice: weight of the per-mask soft Dice loss.
        w_ce: weight of the language model's cross-entropy on the answer tokens (``Sure, <SEG>.``).
        smooth: Laplace smoothing of the Dice ratio in pixels (numerator and denominator), so an empty target mask
            asks for an empty prediction instead of giving an undefined ratio (LISA smooths the same way).

    ``forward(logits, targets, lm_loss=None)`` takes mask logits and binary targets of the same shape
    ``[N, 1, H, W]`` (one class mask per row) and returns a dict of scalars: ``loss`` (the weighted sum to
    back-propagate), ``loss_bce``, ``loss_dice`` and ``loss_ce`` (all detached).
    """

    def __init__(self, w_bce: float = 2.0, w_dice: float = 0.5, w_ce: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if min(w_bce, w_dice, w_ce) < 0:
            raise ValueError(f"loss weights must be non-negative, got w_bce={w_bce}, w_dice={w_dice}, w_ce={w_ce}")
        self.w_bce, self.w_dice, self.w_ce = float(w_bce), float(w_dice), float(w_ce)
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, reduction="mean")

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, lm_loss: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have one shape")
        logits, targets = logits.float(), targets.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        dice = self.dice(logits, targets)
        loss = self.w_bce * bce + self.w_dice * dice
        if lm_loss is not None and lm_loss.requires_grad:
            loss = loss + self.w_ce * lm_loss.float()
        ce = lm_loss.detach().float() if lm_loss is not None else torch.zeros((), device=logits.device)
        return {"loss": loss, "loss_bce": bce.detach(), "loss_dice": dice.detach(), "loss_ce": ce}
