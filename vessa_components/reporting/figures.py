"""Figures a person would rather look at than read: learning curves of validation Dice, Dice against the number of
labelled cases, and the quality of VESSA's pseudo-labels over training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.io import atomic_path  # noqa: E402

__all__ = ["plot_dice_curves", "plot_dice_vs_labeled_cases", "plot_pseudo_label_quality", "sample_std"]


def plot_dice_curves(
    curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], out: str | os.PathLike, title: str = ""
) -> Path:
    """Plot validation mean Dice against iterations, one line (mean over seeds, band = min..max) per method.

    Args:
        curves: method -> one list of ``(iteration, dice in [0, 1])`` per seed.
        out: PNG path.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        iterations = sorted({it for run in runs for it, _ in run})
        values = np.full((len(runs), len(iterations)), np.nan)
        for i, run in enumerate(runs):
            for it, dice in run:
                values[i, iterations.index(it)] = 100.0 * dice
        mean = np.nanmean(values, axis=0)
        (line,) = ax.plot(iterations, mean, marker="o", label=f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        if len(runs) > 1:
            ax.fill_between(iterations, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mean Dice (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1) of ``values``, the spread over seeds the benchmark tables and error bars
    show; 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _save(fig: plt.Figure, out: str | os.PathLike) -> Path:
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # keeps legends placed outside the axes
    plt.close(fig)
    return out


def plot_dice_vs_labeled_cases(
    results: Mapping[int, Mapping[str, Sequence[float]]], out: str | os.PathLike, title: str = ""
) -> Path:
    """Validation mean Dice against the number of labelled cases, one line per method (mean over seeds, error bar =
    sample std over seeds), in the manner of the VESSA paper's Figure 1.

    Args:
        results: labelled cases -> method -> the mean Dice in [0, 1] of each seed.
        out: PNG path.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    cases = sorted(results)
    methods = list(dict.fromkeys(m for n in cases for m in results[n]))
    for method in methods:
        xs = [n for n in cases if results[n].get(method)]
        means = [100.0 * float(np.mean(results[n][method])) for n in xs]
        stds = [100.0 * sample_std(results[n][method]) for n in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xticks(cases)
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("validation mean Dice (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_pseudo_label_quality(
    records: Mapping[str, Sequence[Mapping]], out: str | os.PathLike, title: str = ""
) -> Path:
    """Mean Dice of VESSA's pseudo-labels and of the EMA teacher on a fixed sample of the unlabelled pool (whose hidden
    labels are known) against iterations: solid lines VESSA, dashed the teacher of the same run.

    Args:
        records: run name -> the records a :class:`~vessa_components.handlers.PseudoLabelQuality` handler wrote
            (``iteration``, ``vessa.mean_dice``, ``teacher.mean_dice``).
        out: PNG path.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, run in records.items():
        if not run:
            continue
        iterations = [r["iteration"] for r in run]
        (line,) = ax.plot(iterations, [100.0 * r["vessa"]["mean_dice"] for r in run], marker="o", label=f"{name}: VESSA")
        ax.plot(
            iterations, [100.0 * r["teacher"]["mean_dice"] for r in run], linestyle="--", color=line.get_color(),
            label=f"{name}: teacher",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean Dice on the unlabelled pool (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: the curves fill the axes
    return _save(fig, out)
