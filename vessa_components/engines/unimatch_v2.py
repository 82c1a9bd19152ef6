"""UniMatch V2 (Yang et al., 2024) as a MONAI trainer: the whole algorithm of one iteration reads in ``_iteration``.

Per iteration, with a labelled batch ``(x, y)`` and an unlabelled batch (weak view ``u_w``, strong views ``u_s1``,
``u_s2`` and their CutMix boxes):

1. the EMA teacher predicts on ``u_w``: confidence and pseudo-label per pixel;
2. each strong view gets its partner's content (``flip(0)``) pasted inside its CutMix box, and the pseudo-labels and
   confidences are mixed the same way;
3. the student predicts ``x`` and, in one pass with complementary channel dropout, ``cat(u_s1, u_s2)``;
4. ``loss_x = loss_function(pred_x, y)`` (CE + Dice), ``loss_u`` = mean over the two views of the per-pixel CE with the
   pseudo-label, kept where the teacher's confidence >= ``conf_thresh`` and averaged over all pixels;
5. ``loss = (loss_x + loss_u) / 2``; the EMA teacher is updated by :class:`vessa_components.handlers.EMATeacher`.

Without an unlabelled loader the trainer is plain supervised training (what MONAI Label's training request runs).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Transform
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..transforms.ssl import cutmix_with_flipped_batch

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["METHODS", "UniMatchV2Trainer", "UnlabeledKeys", "cycle_loader", "frozen_batchnorm_stats", "unlabeled_data"]


class UnlabeledKeys:
    """Keys of an unlabelled batch: the weak view, the two strong views and their CutMix boxes."""

    WEAK = "image"
    STRONG1 = "image_s1"
    STRONG2 = "image_s2"
    BOX1 = "cutmix_box1"
    BOX2 = "cutmix_box2"


@contextlib.contextmanager
def frozen_batchnorm_stats(network: torch.nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers normalise with batch statistics as usual but leave their running statistics
    unchanged (momentum 0), so eval-mode predictions keep the statistics of clean inputs."""
    layers = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum


def cycle_loader(loader: Iterable) -> Iterator:
    """Iterate over ``loader`` forever, calling ``sampler.set_epoch`` at each pass so distributed shuffles differ."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class UniMatchV2Trainer(Trainer):
    """Semi-supervised training with UniMatch V2, with the arguments and events of MONAI's ``SupervisedTrainer``.

    Args:
        device: device of the networks.
        max_epochs: number of epochs; with ``epoch_length`` it sets the iteration budget.
        train_data_loader: labelled loader yielding ``{"image", "label"}`` batches.
        network: the student.
        optimizer: optimizer of the student.
        loss_function: supervised loss ``(logits, label) -> loss`` (e.g. ``monai.losses.DiceCELoss``).
        teacher: EMA teacher producing pseudo-labels (required with ``unlabeled_data_loader``); kept in eval mode.
        unlabeled_data_loader: loader of unlabelled batches with the keys of :class:`UnlabeledKeys`; ``None`` gives
            supervised training.
        conf_thresh: teacher confidence (max softmax probability) from which a pseudo-label counts.
        epoch_length: iterations per epoch (default: length of the labelled loader).
        comp_drop: apply complementary channel dropout to the strong views (the network's ``comp_drop`` argument).
        freeze_bn_on_strong: keep BatchNorm running statistics out of the strong-view pass. UniMatch V2's DINOv2
            student has no BatchNorm; a BatchNorm student (the UNet) would otherwise average in the statistics of
            CutMixed, complementary-dropped features (channels x2 or 0), which ruins its eval-mode predictions and,
            through the EMA, the teacher's pseudo-labels.
        other arguments: as in ``monai.engines.SupervisedTrainer``.

    ``engine.state.output`` holds ``loss``, ``loss_x``, ``loss_u`` and ``mask_ratio`` (share of unlabelled pixels whose
    teacher confidence reaches ``conf_thresh``), plus the labelled ``image``, ``label`` and ``pred``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        teacher: torch.nn.Module | None = None,
        unlabeled_data_loader: Iterable | DataLoader | None = None,
        conf_thresh: float = 0.95,
        epoch_length: int | None = None,
        comp_drop: bool = True,
        freeze_bn_on_strong: bool = True,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        if unlabeled_data_loader is not None and teacher is None:
            raise ValueError("UniMatchV2Trainer: an unlabelled loader needs a teacher network for pseudo-labels")
        self.network = network
        self.teacher = teacher
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.conf_thresh = conf_thresh
        self.comp_drop = comp_drop
        self.freeze_bn_on_strong = freeze_bn_on_strong
        self.optim_set_to_none = optim_set_to_none
        self.unlabeled_data_loader = unlabeled_data_loader
        self._unlabeled_batches = None if unlabeled_data_loader is None else cycle_loader(unlabeled_data_loader)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def _next_unlabeled(self) -> dict[str, torch.Tensor]:
        batch = next(self._unlabeled_batches)  # type: ignore[arg-type]
        keys = (UnlabeledKeys.WEAK, UnlabeledKeys.STRONG1, UnlabeledKeys.STRONG2, UnlabeledKeys.BOX1, UnlabeledKeys.BOX2)
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"unlabelled batch lacks {missing}; its transforms must create {list(keys)}")
        return {k: torch.as_tensor(batch[k]).to(self.state.device, non_blocking=self.non_blocking) for k in keys}

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher's per-pixel confidence and label (``[B, H, W]`` each) on the weak view."""
        self.teacher.eval()  # type: ignore[union-attr]
        probs = self.inferer(images, self.teacher).float().softmax(dim=1)
        return probs.max(dim=1)

    def unsupervised_loss(self, logits: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """Per-pixel CE with the pseudo-label, zero where the confidence is below ``conf_thresh``, averaged over pixels."""
        ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
        return (ce * (confidence >= self.conf_thresh)).mean()

    def _iteration(self, engine: UniMatchV2Trainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = batch[:2]
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y}
        unlabeled = engine._next_unlabeled() if engine._unlabeled_batches is not None else None

        if unlabeled is not None:
            conf_w, pseudo_w = engine.pseudo_label(unlabeled[UnlabeledKeys.WEAK])
            box1, box2 = unlabeled[UnlabeledKeys.BOX1], unlabeled[UnlabeledKeys.BOX2]
            strong1 = cutmix_with_flipped_batch(unlabeled[UnlabeledKeys.STRONG1], box1)
            strong2 = cutmix_with_flipped_batch(unlabeled[UnlabeledKeys.STRONG2], box2)
            pseudo1, conf1 = cutmix_with_flipped_batch(pseudo_w, box1), cutmix_with_flipped_batch(conf_w, box1)
            pseudo2, conf2 = cutmix_with_flipped_batch(pseudo_w, box2), cutmix_with_flipped_batch(conf_w, box2)

        def _compute_pred_loss() -> None:
            pred_x = engine.inferer(x, engine.network)
            engine.state.output[Keys.PRED] = pred_x
            loss_x = engine.loss_function(pred_x, y).mean()
            if unlabeled is None:
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                engine.state.output.update({Keys.LOSS: loss_x, "loss_x": loss_x.detach()})
            else:
                strong = torch.cat((strong1, strong2))
                with frozen_batchnorm_stats(engine.network) if engine.freeze_bn_on_strong else contextlib.nullcontext():
                    pred_s1, pred_s2 = engine.inferer(strong, engine.network, comp_drop=engine.comp_drop).chunk(2)
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
                loss_u = (
                    engine.unsupervised_loss(pred_s1, pseudo1, conf1) + engine.unsupervised_loss(pred_s2, pseudo2, conf2)
                ) / 2.0
                engine.state.output.update(
                    {
                        Keys.LOSS: (loss_x + loss_u) / 2.0,
                        "loss_x": loss_x.detach(),
                        "loss_u": loss_u.detach(),
                        "mask_ratio": (conf_w >= engine.conf_thresh).float().mean(),
                    }
                )
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute_pred_loss()
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            _compute_pred_loss()
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


METHODS = ("supervised", "unimatch_v2")


def unlabeled_data(method: str, data: Sequence[dict]) -> list[dict]:
    """The unlabelled samples that ``method`` trains on: none for ``supervised``, all of them for ``unimatch_v2``.

    An empty pool with a semi-supervised method is not an error: training falls back to supervised, with a warning.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    if method == "supervised":
        return []
    if not data:
        warnings.warn(f"method={method} but the unlabelled pool is empty: training is supervised only")
    return list(data)
