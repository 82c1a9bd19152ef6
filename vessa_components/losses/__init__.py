"""Losses: VESSA's Stage-1 mask loss (BCE + Dice per class mask + the VLM's answer cross-entropy)."""

from .vessa import VessaMaskLoss

__all__ = ["VessaMaskLoss"]
