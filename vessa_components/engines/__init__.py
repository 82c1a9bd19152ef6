from .unimatch_v2 import (
    METHODS,
    UniMatchV2Trainer,
    UnlabeledKeys,
    cycle_loader,
    frozen_batchnorm_stats,
    unlabeled_data,
)
from .vessa_stage1 import VessaStage1Trainer

__all__ = [
    "METHODS",
    "UniMatchV2Trainer",
    "UnlabeledKeys",
    "VessaStage1Trainer",
    "cycle_loader",
    "frozen_batchnorm_stats",
    "unlabeled_data",
]
