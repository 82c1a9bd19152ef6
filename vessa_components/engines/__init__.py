from .unimatch_v2 import (
    FUSIONS,
    METHODS,
    PSEUDO_LABEL_SOURCES,
    TEACHER_BN_STATS,
    UNLABELED_LOSSES,
    UniMatchV2Trainer,
    UnlabeledKeys,
    cycle_loader,
    frozen_batchnorm_stats,
    pseudo_label_loss,
    unlabeled_data,
)
from .vessa_labels import VessaPseudoLabeler, build_vessa_labeler
from .vessa_stage1 import VessaStage1Trainer, simulated_feedback

__all__ = [
    "FUSIONS",
    "METHODS",
    "PSEUDO_LABEL_SOURCES",
    "TEACHER_BN_STATS",
    "UNLABELED_LOSSES",
    "UniMatchV2Trainer",
    "UnlabeledKeys",
    "VessaPseudoLabeler",
    "VessaStage1Trainer",
    "build_vessa_labeler",
    "cycle_loader",
    "frozen_batchnorm_stats",
    "pseudo_label_loss",
    "simulated_feedback",
    "unlabeled_data",
]
