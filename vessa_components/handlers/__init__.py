from .checkpoint import TrainingCheckpoint
from .ema import EMATeacher
from .vessa_saver import VessaSaver
from .pseudo_label_quality import PseudoLabelQuality
from .tracking import (
    MLFlowTracker,
    executed_config,
    hyperparameters,
    local_tracking_uri,
    new_run_name,
    resolve_tracking_uri,
    scalar_outputs,
    tracking_server_error,
)
from .vessa_schedule import SCHEDULE_SHAPES, VessaWeightSchedule
from .volume_metrics import VolumeMetricsWriter

__all__ = [
    "SCHEDULE_SHAPES",
    "EMATeacher",
    "MLFlowTracker",
    "PseudoLabelQuality",
    "TrainingCheckpoint",
    "VessaSaver",
    "VessaWeightSchedule",
    "VolumeMetricsWriter",
    "executed_config",
    "hyperparameters",
    "local_tracking_uri",
    "new_run_name",
    "resolve_tracking_uri",
    "scalar_outputs",
    "tracking_server_error",
]
