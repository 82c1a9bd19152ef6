"""Per-volume metrics (Dice, Jaccard, HD95, ASD) of an evaluator's predictions, written as JSON and markdown."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data.utils import affine_to_spacing
from monai.utils import IgniteInfo, min_version, optional_import

from ..metrics import MEAN_ROW, VolumeMetricAccumulator, write_report

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["VolumeMetricsWriter"]


def _label_map(value: torch.Tensor) -> torch.Tensor:
    """[C, *spatial] one-hot or probabilities -> [*spatial] labels; [1, *spatial] labels -> [*spatial]."""
    return value.argmax(0) if value.shape[0] > 1 else value[0]


class VolumeMetricsWriter:
    """Score each volume an evaluator sees with :mod:`vessa_components.metrics` and, at the end of the round, write
    ``metrics.json`` and ``metrics.md`` to ``output_dir`` and put the per-class means in ``engine.state.metrics``
    (``val_dice_<class>``, ``val_hd95_<class>`` ...) for the loggers that follow it.

    Expects decollated outputs (one dict per volume) whose ``pred`` and ``label`` are ``[C, *spatial]`` one-hot maps or
    ``[1, *spatial]`` label maps, with the volume's file in ``label.meta["filename_or_obj"]``.

    Args:
        output_dir: folder of the report files.
        class_names: names of the label values, background first.
        spacing_aware: also report distances in mm, from each label's affine (needs data that stores its spacing).
        prefix: prefix of the keys put in ``engine.state.metrics``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        spacing_aware: bool = False,
        prefix: str = "val_",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.accumulator = VolumeMetricAccumulator(class_names, spacing_aware=spacing_aware)
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.accumulator.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            label = item["label"]
            name = Path(str(label.meta["filename_or_obj"])).name.split(".")[0]
            spacing = None
            if self.accumulator.spacing_aware:
                spacing = affine_to_spacing(label.affine, r=label.ndim - 1).tolist()
            self.accumulator.add(name, _label_map(item["pred"]).cpu(), _label_map(label).cpu(), spacing=spacing)

    def write(self, engine: Engine) -> dict[str, Any]:
        report = write_report(
            self.accumulator.results, self.output_dir / "metrics.json", self.output_dir / "metrics.md"
        )
        for row, metrics in report["summary"].items():
            for metric in ("dice", "jaccard", "hd95", "asd"):
                if metric in metrics:
                    key = f"{self.prefix}{metric}" if row == MEAN_ROW else f"{self.prefix}{metric}_{row}"
                    engine.state.metrics[key] = metrics[metric]["mean"]
        return report
