from .unimatch_v2 import (
    METHODS,
    UniMatchV2Trainer,
    UnlabeledKeys,
    cycle_loader,
    frozen_batchnorm_stats,
    unlabeled_data,
)

__all__ = ["METHODS", "UniMatchV2Trainer", "UnlabeledKeys", "cycle_loader", "frozen_batchnorm_stats", "unlabeled_data"]
