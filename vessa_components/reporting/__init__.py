from .figures import plot_dice_curves
from .report import (
    load_mlflow_scalars,
    load_scalars,
    load_tensorboard_scalars,
    make_report,
    plot_learning_curves,
    plot_overlay,
    predict_volumes,
    select_slices,
)

__all__ = [
    "load_mlflow_scalars",
    "load_scalars",
    "load_tensorboard_scalars",
    "make_report",
    "plot_dice_curves",
    "plot_learning_curves",
    "plot_overlay",
    "predict_volumes",
    "select_slices",
]
