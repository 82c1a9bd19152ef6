"""Build a student network by name, so a bundle switches students with one top-level id (``network_name``)."""

from __future__ import annotations

import os

import torch

from .dino_dpt import DinoDPT
from .unet import UNet

__all__ = ["STUDENTS", "build_student"]

STUDENTS: dict[str, type[torch.nn.Module]] = {"unet": UNet, "dino_dpt": DinoDPT}


def build_student(
    name: str,
    in_channels: int = 1,
    out_channels: int = 4,
    pretrained_path: str | os.PathLike | None = None,
    **kwargs,
) -> torch.nn.Module:
    """Instantiate the student ``name`` (one of :data:`STUDENTS`).

    Args:
        name: ``unet`` (the 1.8 M-parameter UNet of the ACDC tables, trained from scratch) or ``dino_dpt``
            (UniMatch V2's DINOv2 + DPT).
        in_channels: image channels.
        out_channels: classes, background included.
        pretrained_path: local Hugging Face directory of DINOv2 weights (``dino_dpt`` only; empty: random weights).
        kwargs: further constructor arguments of the chosen class.
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown network '{name}'; choose one of {sorted(STUDENTS)}")
    if name == "dino_dpt":
        kwargs["pretrained_path"] = pretrained_path or None
    elif pretrained_path:
        raise ValueError(f"network '{name}' is trained from scratch and takes no pretrained_path ({pretrained_path})")
    return STUDENTS[name](in_channels=in_channels, out_channels=out_channels, **kwargs)
