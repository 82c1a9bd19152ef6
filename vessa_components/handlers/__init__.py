from .checkpoint import TrainingCheckpoint
from .ema import EMATeacher
from .vessa_saver import VessaSaver
from .volume_metrics import VolumeMetricsWriter

__all__ = ["EMATeacher", "TrainingCheckpoint", "VessaSaver", "VolumeMetricsWriter"]
