"""Save what VESSA's Stage 1 produces: the model weights and the template bank they were trained and matched with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from ..templates.bank import TemplateBank
from ..utils.io import atomic_path

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["VessaSaver"]


class VessaSaver:
    """When training completes, write ``models/model.pt`` and ``template_bank/`` under ``output_dir``; keep the bank's
    embeddings in step with a training encoder on the way.

    ``model.pt`` is the network's flat ``state_dict`` (for a :class:`vessa_components.networks.VessaModel`, without
    the frozen weights of a VLM loaded from a checkpoint), written atomically. Nothing is written when training fails,
    so a previous run's files survive a crash.

    A bank embedded by the model being trained (VESSA's SAM2 encoder, ``reembed=True``) goes stale as the weights
    change: it is re-embedded every ``reembed_interval`` iterations, which keeps template matching meaningful during
    training, and once more before saving, so the saved bank matches the saved weights. A bank with a fixed encoder
    (the thumbnail default) is only saved.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is unwrapped).
        bank: the template bank used for training.
        output_dir: folder of ``models/model.pt`` and ``template_bank/``.
        reembed: whether the bank's encoder changes with training.
        reembed_interval: iterations between re-embeddings when ``reembed``; 0 only re-embeds before saving.
        write_files: whether this process writes the files (only rank 0 does in distributed runs; every rank still
            re-embeds its copy of the bank, so all ranks match templates alike).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        bank: TemplateBank,
        output_dir: str | os.PathLike,
        reembed: bool = False,
        reembed_interval: int = 0,
        write_files: bool = True,
    ) -> None:
        self.network = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
        self.bank = bank
        self.output_dir = Path(output_dir)
        self.reembed = bool(reembed)
        self.reembed_interval = int(reembed_interval)
        self.write_files = bool(write_files)

    @property
    def model_path(self) -> Path:
        return self.output_dir / "models" / "model.pt"

    @property
    def bank_dir(self) -> Path:
        return self.output_dir / "template_bank"

    def attach(self, engine: Engine) -> None:
        if self.reembed and self.reembed_interval > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.reembed_interval), self._embed)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _embed(self, engine: Engine) -> None:
        self.bank.embed()

    def save(self, engine: Engine | None = None) -> Path:
        """Write the weights and the bank (re-embedded first when its encoder trains); returns ``output_dir``."""
        if self.reembed:
            self.bank.embed()
        if not self.write_files:
            return self.output_dir
        with atomic_path(self.model_path) as tmp:
            torch.save(self.network.state_dict(), tmp)
        self.bank.save(self.bank_dir)
        return self.output_dir
