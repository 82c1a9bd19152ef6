"""The weight of the VESSA term over training: VESSA guides early, the EMA teacher takes over."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["SCHEDULE_SHAPES", "VessaWeightSchedule"]

SCHEDULE_SHAPES = ("linear", "cosine", "constant")


class VessaWeightSchedule:
    """Sets ``engine.state.vessa_weight`` (``lambda_v``) before every iteration, decaying from ``start`` at iteration 1
    to ``end`` at ``decay_iterations`` and staying there.

    The value is a function of ``engine.state.iteration`` alone (not of a count of calls, as Ignite's state schedulers
    keep), so a run resumed from a checkpoint continues the same curve without saving the schedule.

    Args:
        start: weight at the first iteration.
        end: weight from ``decay_iterations`` on.
        decay_iterations: iterations over which the weight moves from ``start`` to ``end``.
        shape: ``"linear"``, ``"cosine"`` (half cosine) or ``"constant"`` (always ``start``).
    """

    def __init__(self, start: float = 1.0, end: float = 0.0, decay_iterations: int = 1000, shape: str = "linear") -> None:
        if shape not in SCHEDULE_SHAPES:
            raise ValueError(f"unknown VESSA weight schedule '{shape}'; choose one of {SCHEDULE_SHAPES}")
        if decay_iterations < 1:
            raise ValueError(f"decay_iterations must be >= 1, got {decay_iterations}")
        self.start, self.end, self.decay_iterations, self.shape = float(start), float(end), decay_iterations, shape

    def value(self, iteration: int) -> float:
        """``lambda_v`` at the 1-based ``iteration``."""
        if self.shape == "constant":
            return self.start
        progress = min(max(iteration - 1, 0) / self.decay_iterations, 1.0)
        if self.shape == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start + (self.end - self.start) * progress

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        engine.state.vessa_weight = self.value(engine.state.iteration)
