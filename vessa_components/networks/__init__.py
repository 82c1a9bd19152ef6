"""Networks: the semi-supervised students (UNet, DINOv2 + DPT) and, later, the VESSA assistant."""

from .dino_dpt import DinoDPT
from .factory import STUDENTS, build_student
from .unet import UNet

__all__ = ["DinoDPT", "STUDENTS", "UNet", "build_student"]
