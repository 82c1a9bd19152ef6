"""VESSA's Stage-1 training as a MONAI trainer: every labelled slice is paired with templates and the mask of each of
its data set's classes is learned "like the template".

Per iteration, for a batch of labelled slices ``(x, y)`` that may come from several data sets:

1. for each slice and each foreground class of its data set, the template bank's best exemplar of that class from
   **another patient of the same data set** is matched (``TemplateBank.match_batch(..., exclude_patient=...)``); a
   data set with a single labelled patient (one labelled case) draws from that patient's other slices instead;
2. VESSA predicts the class's mask from (slice, template image, template mask, reference text), all classes of all
   slices in one batch;
3. ``loss = w_bce * BCE + w_dice * Dice`` over the class masks ``(y == class)`` ``+ w_ce * LM CE`` on the answer
   tokens when the VLM is trained (:class:`vessa_components.losses.VessaMaskLoss`).

A class absent from a slice is still asked for: its target is empty, so VESSA learns to answer "nothing here", which
Stage 2's pseudo-labels need.

With ``feedback_prompt_prob`` > 0, that share of the iterations also gives VESSA the prompts of Stage 2's feedback (a
dense mask prompt and a box, :func:`~vessa_components.networks.feedback_prompts`) made from a corrupted copy of each
target (:func:`simulated_feedback`: shifted, grown or shrunk, sometimes missing, with a random confidence). Without
it SAM2's mask and box prompt encoders never train, and Stage 2's feedback would reach VESSA through random weights;
with it VESSA learns to refine a rough, partly wrong mask of the class rather than to copy it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.transforms import Transform
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..losses.vessa import VessaMaskLoss
from ..networks.vessa import VessaModel, feedback_prompts
from ..templates.bank import TemplateBank

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["VessaStage1Trainer", "simulated_feedback"]


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def simulated_feedback(
    targets: torch.Tensor, miss_prob: float = 0.2, max_shift: int = 8, max_radius: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for a Stage-2 student's opinion of each target mask ``[N, 1, S, S]``: the mask shifted by up to
    ``max_shift`` pixels along each axis, grown or shrunk by up to ``max_radius`` pixels (max pooling), and with
    probability ``miss_prob`` missing altogether (a student that does not see the class); each sample gets a
    confidence ``c`` drawn from [0.6, 0.99]. Returns the probabilities (``c`` inside the mask, ``1 - c`` outside) and the
    binary masks. Draws from torch's global generator."""
    n = targets.shape[0]
    masks = (targets > 0.5).float()
    radii = torch.randint(-max_radius, max_radius + 1, (n,)).tolist()
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2)).tolist()
    out = []
    for mask, radius, (dy, dx) in zip(masks, radii, shifts):
        if radius:
            pooled = F.max_pool2d(mask[None] if radius > 0 else 1.0 - mask[None], 2 * abs(radius) + 1, 1, abs(radius))[0]
            mask = pooled if radius > 0 else 1.0 - pooled
        out.append(torch.roll(mask, shifts=(dy, dx), dims=(-2, -1)))
    masks = torch.stack(out) * (torch.rand(n, 1, 1, 1, device=targets.device) >= miss_prob)
    confidence = torch.empty(n, 1, 1, 1, device=targets.device).uniform_(0.6, 0.99)
    return masks * confidence + (1.0 - masks) * (1.0 - confidence), masks


class VessaStage1Trainer(Trainer):
    """Stage-1 training of :class:`vessa_components.networks.VessaModel`, with the arguments and events of MONAI's
    ``SupervisedTrainer``.

    Args:
        device: device of the network.
        max_epochs: number of epochs; with ``epoch_length`` it sets the iteration budget.
        train_data_loader: loader of labelled slices ``{"image": [B, 1, S, S] in [0, 1], "label": [B, 1, S, S]
            label values, "patient": [B] ids, "dataset": [B] names}`` (``dataset`` may be left out when the bank
            holds one data set).
        network: the VESSA model (or a ``DistributedDataParallel`` around it).
        optimizer: optimizer of the trained parameters.
        template_bank: the labelled exemplars templates are drawn from (all the training data sets' labelled slices).
        loss_function: ``(logits, targets, lm_loss) -> {"loss", "loss_bce", "loss_dice", "loss_ce"}``; default
            :class:`vessa_components.losses.VessaMaskLoss` (2.0 / 0.5 / 1.0).
        epoch_length: iterations per epoch (default: length of the loader).
        feedback_prompt_prob: share of the iterations in which VESSA is also prompted with simulated Stage-2
            feedback (see the module docstring); 0 never.
        other arguments: as in ``monai.engines.SupervisedTrainer``.

    ``engine.state.output`` holds ``loss``, ``loss_bce``, ``loss_dice``, ``loss_ce``, ``prompted`` (1 when the
    iteration had feedback prompts), the slices (``image``), the class masks (``label``, ``[N, 1, S, S]``, one per slice
    and class) and their logits (``pred``).

    Raises (during the run):
        ValueError: a slice of a data set the bank does not hold, a class with no exemplar from another patient, a
            class the model was not built for, or slices whose size is not the model's ``image_size``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        template_bank: TemplateBank,
        loss_function: Callable[..., dict[str, torch.Tensor]] | None = None,
        epoch_length: int | None = None,
        feedback_prompt_prob: float = 0.0,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
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
        model = _unwrap(network)
        if not isinstance(model, VessaModel):
            raise TypeError(f"VessaStage1Trainer trains a VessaModel, got {type(model).__name__}")
        self.network = network
        self.model = model
        self.optimizer = optimizer
        self.template_bank = template_bank
        self.loss_function = VessaMaskLoss() if loss_function is None else loss_function
        self.optim_set_to_none = optim_set_to_none
        if not 0.0 <= feedback_prompt_prob <= 1.0:
            raise ValueError(f"feedback_prompt_prob must be in [0, 1], got {feedback_prompt_prob}")
        self.feedback_prompt_prob = float(feedback_prompt_prob)

    def make_pairs(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        patients: Sequence[str],
        datasets: Sequence[str] | None,
        names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Pair each slice with one template per foreground class of its data set, from another patient (from another
        slice of the same patient when the bank holds a single patient of the data set).

        Args:
            images: ``[B, 1, S, S]`` slices in [0, 1].
            labels: ``[B, 1, S, S]`` label maps (values index the data set's class names).
            patients: the patient of each slice (its exemplars are excluded from its matches).
            datasets: the data set of each slice; ``None`` when the bank holds exactly one.
            names: the slice names (the bank's exemplar names); needed for a data set with a single patient.

        Returns:
            one VESSA sample per (slice, class): ``images``, ``template_images``, ``template_masks``, ``targets``
            (``[N, 1, S, S]`` each), ``class_indices`` (``[N]``, into the model's ``class_names``), ``modalities``.
        """
        bank, model = self.template_bank, self.model
        if datasets is None:
            if len(bank.datasets()) != 1:
                raise ValueError(f"batches need a 'dataset' key: the template bank holds {bank.datasets()}")
            datasets = bank.datasets() * len(images)
        single_patient = {
            d: len({x.patient for x in bank.exemplars if x.dataset == d}) == 1 for d in set(datasets)
        }
        if names is None and any(single_patient.values()):
            raise KeyError("labelled batches need a 'name' key: a data set has a single labelled patient, so templates "
                           "are drawn from its other slices")
        rows, class_names, query_datasets, query_patients, query_names, values = [], [], [], [], [], []
        for row, (patient, dataset) in enumerate(zip(patients, datasets)):
            for value, name in enumerate(bank.classes(dataset)[1:], start=1):
                rows.append(row)
                class_names.append(name)
                query_datasets.append(dataset)
                query_patients.append(None if single_patient[dataset] else patient)
                query_names.append(names[row] if single_patient[dataset] else None)  # type: ignore[index]
                values.append(value)
        unknown = sorted(set(class_names) - set(model.class_names))
        if unknown:
            raise ValueError(f"classes {unknown} of the training data are not among the model's {model.class_names}")
        index = torch.tensor(rows, device=images.device)
        queries = images.detach().float().cpu()[index.cpu()]
        matches = bank.match_batch(
            queries, class_names, k=1, exclude_patient=query_patients, dataset=query_datasets, exclude_name=query_names
        )
        size = (model.image_size, model.image_size)
        template_images = torch.stack([m[0].image for m in matches])
        template_masks = torch.stack([m[0].mask for m in matches])
        if template_images.shape[-2:] != size:
            template_images = F.interpolate(template_images, size, mode="bilinear", align_corners=False)
            template_masks = F.interpolate(template_masks, size, mode="nearest")
        targets = (labels[index] == torch.tensor(values, device=labels.device).view(-1, 1, 1, 1)).float()
        return dict(
            images=images[index],
            template_images=template_images.to(images.device),
            template_masks=template_masks.to(images.device),
            targets=targets,
            class_indices=torch.tensor([model.class_names.index(c) for c in class_names], device=images.device),
            modalities=[bank.modality(d) for d in query_datasets],
        )

    def _iteration(self, engine: VessaStage1Trainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, labels = batch[:2]
        if "patient" not in batchdata:
            raise KeyError("labelled batches need a 'patient' key: templates are drawn from other patients")
        names = list(batchdata["name"]) if "name" in batchdata else None
        pairs = engine.make_pairs(images, labels, list(batchdata["patient"]), batchdata.get("dataset"), names)
        prompted = engine.feedback_prompt_prob > 0 and float(torch.rand(())) < engine.feedback_prompt_prob
        mask_prompts, boxes = feedback_prompts(*simulated_feedback(pairs["targets"])) if prompted else (None, None)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: pairs["targets"], "prompted": torch.tensor(float(prompted))}

        def _compute_pred_loss() -> None:
            out = engine.network(
                pairs["images"], pairs["template_images"], pairs["template_masks"], pairs["class_indices"],
                mask_prompts=mask_prompts, boxes=boxes, modalities=pairs["modalities"],
            )
            engine.state.output[Keys.PRED] = out["logits"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(out["logits"], pairs["targets"], out["lm_loss"])
            engine.state.output.update({Keys.LOSS: losses["loss"], **{k: v for k, v in losses.items() if k != "loss"}})
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
