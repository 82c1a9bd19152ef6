from .checkpoint import TrainingCheckpoint
from .ema import EMATeacher
from .volume_metrics import VolumeMetricsWriter

__all__ = ["EMATeacher", "TrainingCheckpoint", "VolumeMetricsWriter"]
