"""Resumable training state: one handler that saves it every ``save_interval`` iterations and restores the latest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from ..utils.io import latest_checkpoint

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
    DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = ["TrainingCheckpoint"]

CHECKPOINT_PATTERN = "checkpoint_iteration={global_step}.pt"


class TrainingCheckpoint:
    """Save ``save_dict`` plus the trainer's own state (epoch, iteration) every ``save_interval`` iterations and at the
    end, to ``ckpt_dir/checkpoint_iteration=N.pt``; with ``resume``, load the latest such file when training starts.

    The trainer is added by :meth:`attach`, so a bundle config need not reference the trainer from its own handler
    list. Files are written atomically by Ignite's ``DiskSaver``: a crash never leaves a truncated checkpoint.

    Args:
        ckpt_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict``/``load_state_dict`` (student, EMA teacher, optimizer, scheduler ...).
        save_interval: iterations between checkpoints (0: only at the end).
        resume: continue from the latest checkpoint in ``ckpt_dir`` if there is one (from scratch otherwise).
        n_saved: number of checkpoints kept.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        save_dict: dict[str, Any],
        save_interval: int = 0,
        resume: bool = False,
        n_saved: int = 1,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.resume = resume
        self.n_saved = n_saved
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        saver = Checkpoint(
            objects,
            DiskSaver(str(self.ckpt_dir), require_empty=False, atomic=True),
            filename_pattern=CHECKPOINT_PATTERN,
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        if self.save_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), saver)
        engine.add_event_handler(Events.COMPLETED, saver)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load, objects)

    def _load(self, engine: Engine, objects: dict[str, Any]) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(objects, torch.load(path, map_location="cpu", weights_only=False))
        # the budget is the current run's, not the interrupted one's, so a resumed run may also be extended
        engine.state.max_epochs = max_epochs
        self.logger.info(f"resumed from {path} at iteration {engine.state.iteration}")
