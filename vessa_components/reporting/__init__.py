from .figures import plot_dice_curves, plot_dice_vs_labeled_cases, plot_pseudo_label_quality, sample_std
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
    "plot_dice_vs_labeled_cases",
    "plot_pseudo_label_quality",
    "sample_std",
    "plot_learning_curves",
    "plot_overlay",
    "predict_volumes",
    "select_slices",
]
