"""UniMatch V2 (Yang et al., 2024) as a MONAI trainer: the whole algorithm of one iteration reads in ``_iteration``.

Per iteration, with a labelled batch ``(x, y)`` and an unlabelled batch (weak view ``u_w``, strong views ``u_s1``,
``u_s2`` and their CutMix boxes):

1. the EMA teacher (``pseudo_labels_from="teacher"``, UniMatch V2) or the student itself without gradient
   (``"student"``, UniMatch's medical code) predicts on ``u_w``: confidence and pseudo-label per pixel;
2. each strong view gets its partner's content (``flip(0)``) pasted inside its CutMix box, and the pseudo-labels and
   confidences are mixed the same way;
3. the student predicts ``x`` and, in one pass with complementary channel dropout, ``cat(u_s1, u_s2)``;
4. ``loss_x = loss_function(pred_x, y)`` (CE + Dice), ``loss_u`` = mean over the two views of the loss against the
   pseudo-label on the pixels whose confidence >= ``conf_thresh``: per-pixel CE averaged over all pixels
   (``unlabeled_loss="ce"``, UniMatch V2) or Dice over the kept pixels (``"dice"``, UniMatch's medical code, which
   keeps small classes such as the myocardium from being outvoted by the background);
5. ``loss = (loss_x + loss_u) / 2``; the EMA teacher is updated by :class:`vessa_components.handlers.EMATeacher`.

With VESSA (``vessa``, a :class:`~vessa_components.engines.VessaPseudoLabeler`), VESSA's cached pseudo-label of each
unlabelled slice is resampled onto its weak view and mixed by the same CutMix; ``pseudo_label_fusion`` decides its use:

- ``separate``: ``loss_v`` = the same masked CE with VESSA's labels, kept where VESSA's confidence >=
  ``vessa_conf_thresh``; ``loss = (loss_x + loss_u) / 2 + lambda_v * loss_v``, ``lambda_v`` read from
  ``engine.state.vessa_weight`` (an Ignite state scheduler decays it: VESSA guides early, the teacher takes over);
- ``confidence``: per pixel, the label of the more confident of teacher and VESSA (each against its own threshold)
  replaces the teacher's in ``loss_u``;
- ``agreement``: ``loss_u`` keeps only pixels where both are confident and agree.

With the labeler's ``mutual_learning``, every ``mutual_learning_interval`` iterations VESSA's mask decoder first takes
one step on the teacher's confident pseudo-labels of the reference slices (``loss_ml``), before VESSA labels them.

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
from monai.losses import MaskedDiceLoss
from monai.networks.utils import one_hot
from monai.transforms import Transform
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..transforms.ssl import cutmix_with_flipped_batch
from ..transforms.view import warp_to_view
from .vessa_labels import VessaPseudoLabeler

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = [
    "FUSIONS",
    "METHODS",
    "PSEUDO_LABEL_SOURCES",
    "TEACHER_BN_STATS",
    "UNLABELED_LOSSES",
    "UniMatchV2Trainer",
    "UnlabeledKeys",
    "cycle_loader",
    "frozen_batchnorm_stats",
    "pseudo_label_loss",
    "unlabeled_data",
]


class UnlabeledKeys:
    """Keys of an unlabelled batch: the weak view, the two strong views and their CutMix boxes."""

    WEAK = "image"
    STRONG1 = "image_s1"
    STRONG2 = "image_s2"
    BOX1 = "cutmix_box1"
    BOX2 = "cutmix_box2"
    #: VESSA only: the slice before random augmentation, the weak view's pixel map onto it, the slice's id
    REFERENCE = "image_ref"
    WEAK_TO_REFERENCE = "weak_to_ref"
    ID = "id"


FUSIONS = ("separate", "confidence", "agreement")
TEACHER_BN_STATS = ("ema", "own")
UNLABELED_LOSSES = ("ce", "dice")
PSEUDO_LABEL_SOURCES = ("teacher", "student")


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


# squared_pred with smooth 1e-5 on both sides: the Dice of UniMatch's and SSL4MIS's ACDC code
_masked_dice = MaskedDiceLoss(softmax=True, squared_pred=True, batch=True)


def pseudo_label_loss(logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Loss of ``logits`` ``[B, C, H, W]`` against a pseudo-label ``[B, H, W]`` on the pixels where ``keep`` is true.

    ``kind="ce"``: per-pixel cross-entropy, zero elsewhere, averaged over all pixels (so fewer kept pixels weigh less).
    ``kind="dice"``: soft Dice of the softmax over the kept pixels of the whole batch, averaged over classes
    (background included); 0 when no pixel is kept.
    """
    if kind == "dice":
        target = one_hot(pseudo.unsqueeze(1), num_classes=logits.shape[1])
        return _masked_dice(logits.float(), target, keep.unsqueeze(1).float())
    if kind != "ce":
        raise ValueError(f"unknown unlabeled_loss '{kind}'; choose one of {UNLABELED_LOSSES}")
    ce = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return (ce * keep).mean()


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
        teacher_bn_stats: where the teacher's BatchNorm statistics come from. ``"ema"`` (UniMatch V2): averaged from
            the student with the weights (see :class:`~vessa_components.handlers.EMATeacher`); the teacher predicts in
            eval mode. ``"own"``: the teacher normalises with the statistics of its own input batch (the weak view, or
            the labelled batch when there is no unlabelled data), which also keeps its running statistics, used for
            validation, those of its own weights; pair it with ``EMATeacher(average_buffers=False)``.
        vessa: VESSA's cached pseudo-labels (method ``vessa``); the unlabelled batches then also carry
            :attr:`UnlabeledKeys.REFERENCE`, :attr:`UnlabeledKeys.WEAK_TO_REFERENCE` and :attr:`UnlabeledKeys.ID`.
        vessa_conf_thresh: VESSA confidence from which its pseudo-label counts.
        vessa_weight: ``lambda_v`` until a handler sets ``engine.state.vessa_weight``.
        pseudo_label_fusion: how teacher and VESSA pseudo-labels combine, one of :data:`FUSIONS`.
        unlabeled_loss: loss of a strong view against a pseudo-label on its confident pixels, one of
            :data:`UNLABELED_LOSSES`: ``"ce"`` (UniMatch V2: per-pixel CE, averaged over all pixels) or ``"dice"``
            (UniMatch's medical code: Dice of the softmax, over the batch, background included, on the kept pixels
            only). Also used for VESSA's term.
        pseudo_labels_from: which network predicts the weak view, one of :data:`PSEUDO_LABEL_SOURCES`: the EMA
            ``"teacher"`` (UniMatch V2) or the ``"student"`` itself in training mode without gradient (UniMatch's
            ACDC code). A from-scratch student improves fast in the first thousand iterations, and an EMA teacher
            that lags it gives fewer and staler confident pixels; the EMA teacher is still what validation scores
            and what is saved.
        other arguments: as in ``monai.engines.SupervisedTrainer``.

    ``engine.state.output`` holds ``loss``, ``loss_x``, ``loss_u`` and ``mask_ratio`` (share of unlabelled pixels whose
    teacher confidence reaches ``conf_thresh``), plus the labelled ``image``, ``label`` and ``pred``; with VESSA also
    ``loss_v``, ``mask_ratio_v``, ``vessa_weight``, ``vessa_cache_size`` and ``vessa_hit_rate``, and ``loss_ml`` at the
    iterations where VESSA's mask decoder is fine-tuned (the labeler's ``mutual_learning``).
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
        teacher_bn_stats: str = "ema",
        vessa: VessaPseudoLabeler | None = None,
        vessa_conf_thresh: float = 0.9,
        vessa_weight: float = 1.0,
        pseudo_label_fusion: str = "separate",
        unlabeled_loss: str = "ce",
        pseudo_labels_from: str = "teacher",
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
        if teacher_bn_stats not in TEACHER_BN_STATS:
            raise ValueError(f"unknown teacher_bn_stats '{teacher_bn_stats}'; choose one of {TEACHER_BN_STATS}")
        if isinstance(train_data_loader, DataLoader) and len(train_data_loader) == 0:
            raise ValueError(
                f"the labelled loader yields no batch: {len(train_data_loader.dataset)} labelled samples for batch_size "
                f"{train_data_loader.batch_size} with drop_last; lower batch_size or label more data"
            )
        if pseudo_label_fusion not in FUSIONS:
            raise ValueError(f"unknown pseudo_label_fusion '{pseudo_label_fusion}'; choose one of {FUSIONS}")
        if unlabeled_loss not in UNLABELED_LOSSES:
            raise ValueError(f"unknown unlabeled_loss '{unlabeled_loss}'; choose one of {UNLABELED_LOSSES}")
        if pseudo_labels_from not in PSEUDO_LABEL_SOURCES:
            raise ValueError(
                f"unknown pseudo_labels_from '{pseudo_labels_from}'; choose one of {PSEUDO_LABEL_SOURCES}"
            )
        self.network = network
        self.teacher = teacher
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.conf_thresh = conf_thresh
        self.comp_drop = comp_drop
        self.freeze_bn_on_strong = freeze_bn_on_strong
        self.teacher_bn_stats = teacher_bn_stats
        self.optim_set_to_none = optim_set_to_none
        self.unlabeled_data_loader = unlabeled_data_loader
        self.vessa = vessa
        self.vessa_conf_thresh = vessa_conf_thresh
        self.pseudo_label_fusion = pseudo_label_fusion
        self.unlabeled_loss = unlabeled_loss
        self.pseudo_labels_from = pseudo_labels_from
        self.state.vessa_weight = vessa_weight
        self._unlabeled_batches = None if unlabeled_data_loader is None else cycle_loader(unlabeled_data_loader)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def _next_unlabeled(self) -> dict[str, torch.Tensor]:
        batch = next(self._unlabeled_batches)  # type: ignore[arg-type]
        keys = [UnlabeledKeys.WEAK, UnlabeledKeys.STRONG1, UnlabeledKeys.STRONG2, UnlabeledKeys.BOX1, UnlabeledKeys.BOX2]
        if self.vessa is not None:
            keys += [UnlabeledKeys.REFERENCE, UnlabeledKeys.WEAK_TO_REFERENCE]
        missing = [k for k in [*keys, UnlabeledKeys.ID] if k not in batch and (k != UnlabeledKeys.ID or self.vessa)]
        if missing:
            raise KeyError(f"unlabelled batch lacks {missing}; its transforms must create {list(keys)}")
        out = {k: torch.as_tensor(batch[k]).to(self.state.device, non_blocking=self.non_blocking) for k in keys}
        if self.vessa is not None:
            out[UnlabeledKeys.ID] = [str(i) for i in batch[UnlabeledKeys.ID]]
        return out

    @torch.no_grad()
    def teacher_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher's ``[B, C, H, W]`` probabilities (with ``teacher_bn_stats="own"`` its BatchNorm layers use, and
        update their running statistics with, this batch's statistics)."""
        self.teacher.train(self.teacher_bn_stats == "own")  # type: ignore[union-attr]
        probs = self.inferer(images, self.teacher).float().softmax(dim=1)
        self.teacher.eval()  # type: ignore[union-attr]
        return probs

    def pseudo_label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel confidence and label (``[B, H, W]`` each) on the weak view, from the network that
        ``pseudo_labels_from`` names."""
        if self.pseudo_labels_from == "teacher":
            return self.teacher_probabilities(images).max(dim=1)
        if self.teacher_bn_stats == "own":
            self.teacher_probabilities(images)  # keeps the teacher's running statistics its own for validation
        self.network.train()
        with torch.no_grad():
            return self.inferer(images, self.network).float().softmax(dim=1).max(dim=1)

    def unsupervised_loss(self, logits: torch.Tensor, pseudo: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C, H, W]`` against the pseudo-label ``[B, H, W]`` where ``keep`` is true: per-pixel
        CE averaged over all pixels, or the Dice of the kept pixels (see ``unlabeled_loss``)."""
        return pseudo_label_loss(logits, pseudo, keep, self.unlabeled_loss)

    @torch.no_grad()
    def vessa_pseudo_label(self, unlabeled: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """VESSA's label and confidence ``[B, H, W]`` on the weak view (0 confidence where the view shows pixels
        outside the reference slice)."""
        labels, confidence = self.vessa(  # type: ignore[misc]
            unlabeled[UnlabeledKeys.ID], unlabeled[UnlabeledKeys.REFERENCE], self.state.iteration, self._teacher_eval
        )
        maps = torch.stack((labels.float(), confidence), dim=1)
        warped = warp_to_view(maps, unlabeled[UnlabeledKeys.WEAK_TO_REFERENCE], mode="nearest")
        return warped[:, 0].round().long(), warped[:, 1]

    def vessa_learn_from_teacher(self, unlabeled: dict[str, Any]) -> dict[str, torch.Tensor]:
        """When the labeler's mutual learning is due at this iteration, one fine-tuning step of VESSA's mask decoder
        on the eval-mode teacher's confident labels of the reference slices: ``{"loss_ml": ...}``; ``{}`` otherwise."""
        if not self.vessa.mutual_learning_due(self.state.iteration):  # type: ignore[union-attr]
            return {}
        reference = unlabeled[UnlabeledKeys.REFERENCE]
        result = self.vessa.learn_from_teacher(  # type: ignore[union-attr]
            reference, self._teacher_eval(reference), iteration=self.state.iteration
        )
        return {"loss_ml": torch.tensor(result["loss_ml"])}

    @torch.no_grad()
    def _teacher_eval(self, images: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # type: ignore[union-attr]
        return self.inferer(images, self.teacher).float().softmax(dim=1)

    def fuse(
        self, pseudo_t: torch.Tensor, conf_t: torch.Tensor, pseudo_v: torch.Tensor, conf_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-label and keep-mask of ``loss_u`` under ``confidence`` or ``agreement`` fusion."""
        keep_t, keep_v = conf_t >= self.conf_thresh, conf_v >= self.vessa_conf_thresh
        if self.pseudo_label_fusion == "agreement":
            return pseudo_t, keep_t & keep_v & (pseudo_t == pseudo_v)
        take_v = keep_v & (~keep_t | (conf_v > conf_t))
        return torch.where(take_v, pseudo_v, pseudo_t), keep_t | keep_v

    def _iteration(self, engine: UniMatchV2Trainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = batch[:2]
        engine.state.output = {Keys.IMAGE: x, Keys.LABEL: y}
        unlabeled = engine._next_unlabeled() if engine._unlabeled_batches is not None else None
        if unlabeled is None and engine.teacher is not None and engine.teacher_bn_stats == "own":
            engine.teacher_probabilities(x)  # keeps the teacher's running statistics its own for validation

        use_vessa = unlabeled is not None and engine.vessa is not None
        if unlabeled is not None:
            conf_w, pseudo_w = engine.pseudo_label(unlabeled[UnlabeledKeys.WEAK])
            keep_w = conf_w >= engine.conf_thresh
            mask_ratio = keep_w.float().mean()
            if use_vessa:
                engine.state.output.update(engine.vessa_learn_from_teacher(unlabeled))
                pseudo_v, conf_v = engine.vessa_pseudo_label(unlabeled)
                keep_v = conf_v >= engine.vessa_conf_thresh
                if engine.pseudo_label_fusion != "separate":
                    pseudo_w, keep_w = engine.fuse(pseudo_w, conf_w, pseudo_v, conf_v)
            box1, box2 = unlabeled[UnlabeledKeys.BOX1], unlabeled[UnlabeledKeys.BOX2]
            mix1 = lambda t: cutmix_with_flipped_batch(t, box1)  # noqa: E731
            mix2 = lambda t: cutmix_with_flipped_batch(t, box2)  # noqa: E731
            strong1, strong2 = mix1(unlabeled[UnlabeledKeys.STRONG1]), mix2(unlabeled[UnlabeledKeys.STRONG2])
            pseudo1, keep1, pseudo2, keep2 = mix1(pseudo_w), mix1(keep_w), mix2(pseudo_w), mix2(keep_w)

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
                    engine.unsupervised_loss(pred_s1, pseudo1, keep1) + engine.unsupervised_loss(pred_s2, pseudo2, keep2)
                ) / 2.0
                loss = (loss_x + loss_u) / 2.0
                engine.state.output.update({"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "mask_ratio": mask_ratio})
                if use_vessa:
                    loss_v, terms = engine._vessa_terms(pred_s1, pred_s2, pseudo_v, keep_v, mix1, mix2)
                    engine.state.output.update(terms)
                    if engine.pseudo_label_fusion == "separate":
                        loss = loss + engine.state.vessa_weight * loss_v
                engine.state.output[Keys.LOSS] = loss
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

    def _vessa_terms(
        self,
        pred_s1: torch.Tensor,
        pred_s2: torch.Tensor,
        pseudo_v: torch.Tensor,
        keep_v: torch.Tensor,
        mix1: Callable[[torch.Tensor], torch.Tensor],
        mix2: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``loss_v`` (with its graph) and the VESSA entries of ``state.output``."""
        loss_v = (
            self.unsupervised_loss(pred_s1, mix1(pseudo_v), mix1(keep_v))
            + self.unsupervised_loss(pred_s2, mix2(pseudo_v), mix2(keep_v))
        ) / 2.0
        return loss_v, {
            "loss_v": loss_v.detach(),
            "mask_ratio_v": keep_v.float().mean(),
            "vessa_weight": torch.tensor(float(self.state.vessa_weight)),
            "vessa_cache_size": torch.tensor(float(len(self.vessa))),  # type: ignore[arg-type]
            "vessa_hit_rate": torch.tensor(self.vessa.hit_rate),  # type: ignore[union-attr]
        }


METHODS = ("supervised", "unimatch_v2", "vessa")


def unlabeled_data(method: str, data: Sequence[dict]) -> list[dict]:
    """The unlabelled samples that ``method`` trains on: none for ``supervised``, all of them otherwise, each with an
    ``id`` (its image path unless given) that keys VESSA's pseudo-label cache.

    An empty pool with a semi-supervised method is not an error: training falls back to supervised, with a warning.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
    if method == "supervised":
        return []
    if not data:
        warnings.warn(f"method={method} but the unlabelled pool is empty: training is supervised only")
    return [{UnlabeledKeys.ID: str(item["image"]), **item} for item in data]
