from .checkpoint import TrainingCheckpoint
from .ema import EMATeacher

__all__ = ["EMATeacher", "TrainingCheckpoint"]
