"""Aggregate per-volume metrics into a report: mean and standard deviation per class and over classes.

The report is a JSON-able dict::

    {"empty_rule": str, "summary_rule": str, "units": {metric: unit}, "classes": [class, ...], "num_volumes": int,
     "per_volume": {volume: {class: {metric: value, "prediction_empty": bool, "reference_empty": bool}}},
     "empty_cases": [{"volume", "class", "prediction_empty", "reference_empty"}, ...],
     "summary": {class | "mean": {metric: {"mean": float, "std": float}}}}

and :func:`format_markdown` turns it into the table of a paper (Dice and Jaccard in percent).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vessa_components.metrics.volume import (
    EMPTY_RULE,
    MM_SUFFIX,
    VolumeResult,
    compute_volume_metrics,
    metric_unit,
)
from vessa_components.utils.io import write_json, write_text

__all__ = [
    "SUMMARY_RULE",
    "MEAN_ROW",
    "summarize",
    "build_report",
    "format_markdown",
    "write_report",
    "VolumeMetricAccumulator",
]

#: how the summary is aggregated (included in every report)
SUMMARY_RULE = (
    "Per class: mean and population standard deviation (numpy's default, ddof=0) over volumes. Row 'mean': for each "
    "volume the mean over its foreground classes of each metric, then the mean and standard deviation of these "
    "per-volume means over volumes (so its mean equals the mean of the class means, its std is across volumes)."
)

#: summary key of the average over classes
MEAN_ROW = "mean"

#: flags of a class result that are not metrics
_FLAGS = ("prediction_empty", "reference_empty")


def _classes_and_metrics(per_volume: Mapping[str, VolumeResult]) -> tuple[list[str], list[str]]:
    """The class names and metric names shared by every volume; ``ValueError`` if the volumes disagree."""
    if not per_volume:
        raise ValueError("no volumes to summarize.")
    first_name, first = next(iter(per_volume.items()))
    classes = list(first)
    metrics = [key for key in next(iter(first.values())) if key not in _FLAGS]
    for name, result in per_volume.items():
        if list(result) != classes:
            raise ValueError(f"{name}: classes {list(result)} differ from {first_name}'s {classes}.")
        for class_name, values in result.items():
            if [key for key in values if key not in _FLAGS] != metrics:
                raise ValueError(
                    f"{name}/{class_name}: metrics {list(values)} differ from {metrics}"
                    " (was the spacing given for some volumes only?)."
                )
    return classes, metrics


def summarize(per_volume: Mapping[str, VolumeResult]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over volumes of every metric, per class and averaged over classes.

    Args:
        per_volume: volume name -> :func:`~vessa_components.metrics.volume.compute_volume_metrics` result.

    Returns:
        ``{class | "mean": {metric: {"mean": float, "std": float}}}``, aggregated as :data:`SUMMARY_RULE` says.
    """
    classes, metrics = _classes_and_metrics(per_volume)
    # values[v, c, m]: volume v, class c, metric m
    values = np.array(
        [[[result[c][m] for m in metrics] for c in classes] for result in per_volume.values()], dtype=np.float64
    )
    rows = {c: values[:, i] for i, c in enumerate(classes)}
    rows[MEAN_ROW] = values.mean(axis=1)
    return {
        row: {m: {"mean": float(table[:, j].mean()), "std": float(table[:, j].std())} for j, m in enumerate(metrics)}
        for row, table in rows.items()
    }


def build_report(per_volume: Mapping[str, VolumeResult]) -> dict[str, Any]:
    """The JSON-able report of a set of volumes (see the module docstring for its layout)."""
    classes, metrics = _classes_and_metrics(per_volume)
    empty_cases = [
        {"volume": name, "class": c, **{flag: values[flag] for flag in _FLAGS}}
        for name, result in per_volume.items()
        for c, values in result.items()
        if any(values[flag] for flag in _FLAGS)
    ]
    return {
        "empty_rule": EMPTY_RULE,
        "summary_rule": SUMMARY_RULE,
        "units": {m: metric_unit(m) for m in metrics},
        "classes": classes,
        "num_volumes": len(per_volume),
        "per_volume": {name: {c: dict(values) for c, values in result.items()} for name, result in per_volume.items()},
        "empty_cases": empty_cases,
        "summary": summarize(per_volume),
    }


def format_markdown(report: Mapping[str, Any]) -> str:
    """A markdown table of the report's summary: rows are the classes and their mean, cells ``mean ± std``.

    Dice and Jaccard are in percent; HD95 and ASD (medpy's definitions) in voxels, plus columns in mm when the report
    has them.
    """
    summary = report["summary"]
    columns = [("dice", "Dice (%)", 100.0), ("jaccard", "Jaccard (%)", 100.0)]
    columns += [("hd95", "HD95 (voxels)", 1.0), ("asd", "ASD (voxels)", 1.0)]
    if f"hd95{MM_SUFFIX}" in report["units"]:
        columns += [(f"hd95{MM_SUFFIX}", "HD95 (mm)", 1.0), (f"asd{MM_SUFFIX}", "ASD (mm)", 1.0)]
    lines = [
        "| Class | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in [*report["classes"], MEAN_ROW]:
        stats = [summary[row][metric] for metric, _, _ in columns]
        cells = [f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}" for s, (_, _, scale) in zip(stats, columns)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{report['num_volumes']} volumes, mean ± std over volumes; HD95 = 95th percentile of both directed "
        "surface-distance sets together, ASD = mean distance from the prediction's surface to the reference's (medpy)."
    )
    return "\n".join(lines) + "\n"


def write_report(
    results: Mapping[str, VolumeResult], out_json: str | os.PathLike, out_md: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Build the report of ``results`` (volume name -> metrics), write it as JSON (and the markdown table) atomically.

    Returns:
        the report.
    """
    report = build_report(results)
    markdown = format_markdown(report)
    write_json(Path(out_json), report)
    if out_md is not None:
        write_text(Path(out_md), markdown)
    return report


class VolumeMetricAccumulator:
    """Collects per-volume metrics one volume at a time, e.g. from a MONAI/Ignite evaluator's handler.

    Args:
        class_names: names of the label values ``0..C`` (index 0 is the background, not scored).
        spacing_aware: also report distances in mm; :meth:`add` then needs each volume's spacing. When ``False``
            only voxel distances are computed and a given spacing is ignored, so every volume has the same metrics.

    Example::

        accumulator = VolumeMetricAccumulator(ACDC_CLASS_NAMES)
        for name, pred, label in volumes:
            accumulator.add(name, pred, label)
        best = accumulator.mean_dice()
    """

    def __init__(self, class_names: Sequence[str], spacing_aware: bool = False):
        self.class_names = tuple(class_names)
        self.spacing_aware = spacing_aware
        self._results: dict[str, VolumeResult] = {}

    def __len__(self) -> int:
        return len(self._results)

    @property
    def results(self) -> dict[str, VolumeResult]:
        """Volume name -> metrics of the volumes added so far."""
        return dict(self._results)

    def reset(self) -> None:
        """Forget every volume (e.g. at the start of a validation round)."""
        self._results.clear()

    def add(
        self,
        name: str,
        pred: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        spacing: Sequence[float] | None = None,
    ) -> VolumeResult:
        """Score one volume (label maps without a channel dimension) and keep its metrics under ``name``."""
        if name in self._results:
            raise ValueError(f"{name}: this volume was already added.")
        if self.spacing_aware and spacing is None:
            raise ValueError(f"{name}: spacing_aware is set, so the volume's spacing is needed.")
        result = compute_volume_metrics(
            pred, label, self.class_names, spacing=spacing if self.spacing_aware else None, name=name
        )
        self._results[name] = result
        return result

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """:func:`summarize` of the volumes added so far."""
        return summarize(self._results)

    def report(self) -> dict[str, Any]:
        """:func:`build_report` of the volumes added so far."""
        return build_report(self._results)

    def mean_dice(self) -> float:
        """Mean over volumes of the per-volume mean Dice over classes (the usual model-selection score)."""
        return self.summary()[MEAN_ROW]["dice"]["mean"]
