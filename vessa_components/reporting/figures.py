"""Figures a person would rather look at than read: learning curves of validation Dice."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.io import atomic_path  # noqa: E402

__all__ = ["plot_dice_curves"]


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
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
