"""How good VESSA's pseudo-labels are on the unlabelled pool during Stage 2, scored against the pool's hidden labels.

In the SSL4MIS layout the "unlabelled" training slices still hold their ``label`` dataset (the split into labelled and
unlabelled patients is made by the datalist, not by the files), so the pseudo-labels that drive ``loss_v`` can be
scored while training runs: does VESSA beat the EMA teacher on the pool, and does the teacher's feedback help it?
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Resized
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from ..data.errors import DataError
from ..data.h5 import LoadH5d
from ..utils import write_json

if TYPE_CHECKING:
    from ignite.engine import Engine, Events

    from ..engines.vessa_labels import VessaPseudoLabeler
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["PseudoLabelQuality", "pooled_dice", "pool_subset"]

#: VESSA confidence threshold when neither the handler nor the engine gives one (the trainer's default)
DEFAULT_CONF_THRESH = 0.9


def pool_subset(size: int, num: int, seed: int = 0) -> list[int]:
    """``min(num, size)`` sorted indices spread evenly over ``range(size)``: the range is cut into ``num`` equal strata
    and one index is drawn from each with a generator seeded by ``seed`` (so the same pool always gives the same
    subset)."""
    if num >= size:
        return list(range(size))
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, size, num + 1)
    starts, stops = np.ceil(edges[:-1]).astype(int), np.ceil(edges[1:]).astype(int)
    return [int(rng.integers(lo, max(hi, lo + 1))) for lo, hi in zip(starts, stops)]


def pooled_dice(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None
) -> list[float | None]:
    """Dice of each foreground class (1 .. ``num_classes`` - 1) between label maps ``pred`` and ``label`` (same shape,
    e.g. ``[N, H, W]``), pooled over all their pixels (one Dice per class for the whole set, not a mean of per-slice
    Dice), restricted to the pixels where ``mask`` is true when given.

    Returns:
        one value in [0, 1] per foreground class; ``None`` for a class absent from both ``pred`` and ``label`` (its
        Dice is undefined and it is left out of means).
    """
    if mask is not None:
        pred, label = pred[mask], label[mask]
    scores: list[float | None] = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        total = int(p.sum()) + int(g.sum())
        scores.append(None if total == 0 else 2.0 * int((p & g).sum()) / total)
    return scores


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _has_label(path: str | os.PathLike) -> bool:
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with h5py.File(os.fspath(path), "r") as f:
            return "label" in f
    except (OSError, ValueError) as e:
        raise DataError(path, f"unreadable HDF5 file (corrupt or truncated?): {e}") from e


class PseudoLabelQuality:
    """Score VESSA's pseudo-labels and the EMA teacher's prediction on a fixed subset of the unlabelled pool, every
    ``interval`` iterations and when training completes.

    At attach, ``num_slices`` slices spread evenly over the pool (see :func:`pool_subset`) are loaded once with their
    hidden labels and resized to ``image_size`` (bilinear image, nearest label): the reference grid on which the
    trainer's unlabelled pipeline builds ``image_ref`` and VESSA caches its pseudo-labels. At each evaluation, without
    gradient:

    - VESSA: ``labeler.predict(images, teacher_probs)``, prompted with the teacher's probabilities when
      ``labeler.feedback_active(iteration)``, as the trainer does; it always runs afresh (it neither reads nor fills
      the labeler's cache), so it scores the pseudo-labels the current settings give, not stale cached ones;
    - the teacher: its softmax in eval mode (its train/eval mode is restored afterwards, and eval mode leaves its
      BatchNorm running statistics unchanged).

    Scores (all in [0, 1]):

    - ``dice``: per foreground class, the Dice of the hard (argmax) prediction against the label, pooled over all
      pixels of the subset (one Dice per class, not a mean over slices). A class absent from both prediction and
      label has no Dice: it is ``null`` in the JSON and left out of ``mean_dice``;
    - ``mean_dice``: the mean of the classes' Dice;
    - ``kept_share`` (VESSA only): the share of the subset's pixels whose VESSA confidence (max probability) reaches
      the VESSA confidence threshold, i.e. the pixels ``loss_v`` trains on;
    - ``kept_accuracy``: the share of those kept pixels whose VESSA label is right (background included);
      ``kept_mean_dice``: the mean foreground Dice on the kept pixels only. Both ``null`` when no pixel is kept.

    Each evaluation appends a record to ``output_file`` (a JSON list, rewritten atomically)::

        {"iteration": 100, "feedback": false, "num_slices": 32, "conf_thresh": 0.9,
         "vessa": {"dice": {"<class>": 0.81, ...}, "mean_dice": 0.78, "kept_share": 0.93, "kept_accuracy": 0.97,
                   "kept_mean_dice": 0.84},
         "teacher": {"dice": {"<class>": 0.62, ...}, "mean_dice": 0.60}}

    and sets ``engine.state.metrics["vessa_pool_dice"]`` and ``["teacher_pool_dice"]`` (the two ``mean_dice``; NaN
    when undefined) for the loggers that follow it. When training completes at an iteration already scored, no record
    is added. A run resumed into the same ``output_dir`` keeps the file's records up to the iteration it resumed from; a
    run from iteration 0 replaces the file, so records of an older run in the same folder do not survive.
    In a distributed run only rank 0 scores and writes.

    Args:
        labeler: VESSA's pseudo-labeler; ``None`` (any method but ``vessa``) makes the handler do nothing, so a bundle
            can always reference it.
        teacher: the EMA teacher network, ``[B, 1, H, W] -> [B, C, H, W]`` logits.
        data: the unlabelled datalist entries (dicts whose ``image`` is the path of an SSL4MIS-style h5 slice that
            also holds a ``label`` dataset).
        class_names: the label values' names, background first.
        interval: iterations between evaluations.
        output_file: the JSON file of the records.
        image_size: side in pixels of the reference grid (the bundle's ``roi_size``).
        num_slices: size of the scored subset (the whole pool when smaller).
        conf_thresh: VESSA confidence from which a pixel counts as kept; ``None`` reads the trainer's
            ``vessa_conf_thresh`` (else 0.9).
        batch_size: slices per forward pass.
        seed: seed of the subset's choice.

    Raises:
        DataError: at attach, a label value outside ``0 .. len(class_names) - 1`` or a slice that is not 2-D (the
            error names the file).
    """

    def __init__(
        self,
        labeler: VessaPseudoLabeler | None,
        teacher: nn.Module,
        data: Sequence[Mapping[str, Any]],
        class_names: Sequence[str],
        interval: int,
        output_file: str | os.PathLike,
        image_size: int,
        num_slices: int = 32,
        conf_thresh: float | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        if len(class_names) < 2:
            raise ValueError(f"class_names must hold the background and at least one class, got {list(class_names)}")
        self.labeler = labeler
        self.teacher = teacher
        self.data = list(data)
        self.class_names = list(class_names)
        self.interval = interval
        self.output_file = Path(output_file)
        self.image_size = int(image_size)
        self.num_slices = num_slices
        self.conf_thresh = conf_thresh
        self.batch_size = max(1, int(batch_size))
        self.seed = seed
        self.logger = logging.getLogger(__name__)
        self.files: list[str] = []
        self.images: torch.Tensor | None = None  # [N, 1, S, S] float32, on the CPU
        self.labels: torch.Tensor | None = None  # [N, S, S] long, on the CPU
        self.records: list[dict[str, Any]] | None = None  # loaded from output_file at the first evaluation
        self.start_iteration: int | None = None  # the iteration the run started from (> 0 when resumed)

    @property
    def active(self) -> bool:
        """Whether the handler scores anything (a labeler and a labelled subset)."""
        return self.labeler is not None and self.images is not None

    def attach(self, engine: Engine) -> None:
        if self.labeler is None:
            return
        self.load()
        if self.images is None:
            return
        engine.add_event_handler(Events.ITERATION_STARTED, self._mark_start)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def _mark_start(self, engine: Engine) -> None:
        # read at the first iteration, not at STARTED, so that a checkpoint loaded at STARTED is already applied
        if self.start_iteration is None:
            self.start_iteration = int(engine.state.iteration) - 1

    def load(self) -> None:
        """Load the subset's slices and labels on the reference grid (once; inert when the pool has no labels)."""
        if self.images is not None:
            return
        pool = sorted(self.data, key=lambda e: os.fspath(e["image"]))
        chosen = [os.fspath(pool[i]["image"]) for i in pool_subset(len(pool), self.num_slices, self.seed)]
        files = [f for f in chosen if _has_label(f)]
        if len(files) < len(chosen):
            missing = [f for f in chosen if f not in files]
            what = "none of" if not files else f"{len(missing)} of"
            warnings.warn(
                f"PseudoLabelQuality: {what} the {len(chosen)} unlabelled slices it scores hold a 'label' dataset "
                f"(e.g. {missing[0]}); "
                + ("pseudo-label quality is not measured" if not files else "those are left out")
            )
        if not files:
            return
        size = (self.image_size, self.image_size)
        pipeline = Compose(
            [
                LoadH5d(["image", "label"], dtypes=np.float32),
                EnsureChannelFirstd(["image", "label"], channel_dim="no_channel"),
                # the trainer's unlabelled pipeline resizes the image the same way before copying it to image_ref
                Resized(["image", "label"], spatial_size=size, mode=["bilinear", "nearest"]),
            ]
        )
        images, labels = [], []
        num_classes = len(self.class_names)
        for f in files:
            item = pipeline({"image": f, "label": f})
            label = item["label"].as_tensor()
            if label.ndim != 3:
                raise DataError(f, f"expected a 2-D slice, got a label of shape {tuple(label.shape[1:])}")
            lo, hi = float(label.min()), float(label.max())
            if lo < 0 or hi > num_classes - 1 or not torch.equal(label, label.round()):
                raise DataError(
                    f, f"label values {lo:g}..{hi:g} outside the classes 0..{num_classes - 1} ({self.class_names})"
                )
            images.append(item["image"].as_tensor().float())
            labels.append(label[0].long())
        self.files = files
        self.images, self.labels = torch.stack(images), torch.stack(labels)

    def _device(self, engine: Engine) -> torch.device:
        device = getattr(engine.state, "device", None)
        if device is not None:
            return torch.device(device)
        param = next(self.teacher.parameters(), None)
        return torch.device("cpu") if param is None else param.device

    def _threshold(self, engine: Engine) -> float:
        if self.conf_thresh is not None:
            return float(self.conf_thresh)
        return float(getattr(engine, "vessa_conf_thresh", DEFAULT_CONF_THRESH))

    @torch.no_grad()
    def evaluate(self, engine: Engine) -> dict[str, Any]:
        """Score VESSA and the teacher on the subset at the engine's iteration and return the record."""
        assert self.labeler is not None and self.images is not None and self.labels is not None
        iteration = int(engine.state.iteration)
        feedback = self.labeler.feedback_active(iteration)
        device = self._device(engine)
        inferer = getattr(engine, "inferer", None)
        was_training = self.teacher.training
        self.teacher.eval()
        vessa_probs, teacher_probs = [], []
        try:
            for start in range(0, self.images.shape[0], self.batch_size):
                x = self.images[start : start + self.batch_size].to(device)
                logits = inferer(x, self.teacher) if inferer is not None else self.teacher(x)
                t_probs = logits.float().softmax(dim=1)
                v_probs = self.labeler.predict(x, t_probs if feedback else None)
                teacher_probs.append(t_probs.cpu())
                vessa_probs.append(v_probs.float().cpu())
        finally:
            self.teacher.train(was_training)
        t_probs, v_probs = torch.cat(teacher_probs), torch.cat(vessa_probs)
        num_classes = len(self.class_names)
        for name, probs in (("VESSA", v_probs), ("teacher", t_probs)):
            if probs.shape[1] != num_classes:
                raise ValueError(f"PseudoLabelQuality: {name} gives {probs.shape[1]} classes, expected {num_classes}")
        label = self.labels
        conf_v, pred_v = v_probs.max(dim=1)
        pred_t = t_probs.argmax(dim=1)
        thresh = self._threshold(engine)
        kept = conf_v >= thresh
        n_kept = int(kept.sum())
        names = self.class_names[1:]
        dice_v, dice_t = pooled_dice(pred_v, label, num_classes), pooled_dice(pred_t, label, num_classes)
        return {
            "iteration": iteration,
            "feedback": bool(feedback),
            "num_slices": int(label.shape[0]),
            "conf_thresh": thresh,
            "vessa": {
                "dice": dict(zip(names, dice_v)),
                "mean_dice": _mean(dice_v),
                "kept_share": n_kept / kept.numel(),
                "kept_accuracy": float((pred_v[kept] == label[kept]).float().mean()) if n_kept else None,
                "kept_mean_dice": _mean(pooled_dice(pred_v, label, num_classes, kept)) if n_kept else None,
            },
            "teacher": {"dice": dict(zip(names, dice_t)), "mean_dice": _mean(dice_t)},
        }

    def _load_records(self, start_iteration: int) -> list[dict[str, Any]]:
        """The records of ``output_file`` up to ``start_iteration`` (a resumed run continues its file)."""
        if start_iteration <= 0 or not self.output_file.is_file():
            return []
        try:
            old = json.loads(self.output_file.read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(old, list):
            return []
        return [r for r in old if isinstance(r, dict) and isinstance(r.get("iteration"), int) and r["iteration"] <= start_iteration]

    def __call__(self, engine: Engine) -> None:
        if not self.active:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        iteration = int(engine.state.iteration)
        if self.records is None:
            self.records = self._load_records(self.start_iteration or 0)
        if self.records and self.records[-1]["iteration"] == iteration:
            return  # COMPLETED right after an interval's evaluation: nothing new to score
        record = self.evaluate(engine)
        self.records.append(record)
        write_json(self.output_file, self.records)
        nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
        engine.state.metrics["vessa_pool_dice"] = nan(record["vessa"]["mean_dice"])
        engine.state.metrics["teacher_pool_dice"] = nan(record["teacher"]["mean_dice"])
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        self.logger.info(
            f"pool pseudo-labels at iteration {iteration} ({record['num_slices']} unlabelled slices, "
            f"feedback {'on' if record['feedback'] else 'off'}): VESSA mean Dice {fmt(record['vessa']['mean_dice'])}, "
            f"teacher {fmt(record['teacher']['mean_dice'])}; VESSA keeps {record['vessa']['kept_share']:.1%} of pixels "
            f"(conf >= {record['conf_thresh']:g}), accuracy there {fmt(record['vessa']['kept_accuracy'])}"
        )
