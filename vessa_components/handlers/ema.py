"""The EMA teacher of mean-teacher style training, as an Ignite handler whose state is checkpointed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["EMATeacher"]


class EMATeacher:
    """After every iteration, move the teacher's weights and buffers toward the student's:
    ``teacher = r * teacher + (1 - r) * student`` with ``r = min(1 - 1 / (t + 1), decay)`` at 0-based iteration ``t``
    (UniMatch V2's warm-up: early teachers follow the student closely).

    Pass it in a checkpoint's ``save_dict`` to save and restore the teacher with the rest of the training state.

    Args:
        student: the trained network (may be wrapped in ``DistributedDataParallel``).
        teacher: a network of the same architecture; it gets no gradients.
        decay: the EMA decay once warmed up (0.996 in UniMatch V2).
        average_buffers: also average the floating-point buffers (BatchNorm running statistics), as UniMatch V2 does.
            ``False`` leaves them to the teacher's own forward passes (``UniMatchV2Trainer(teacher_bn_stats="own")``):
            statistics averaged from the student do not match the averaged weights of a network trained from scratch,
            whose eval-mode predictions they ruin.
    """

    def __init__(
        self, student: torch.nn.Module, teacher: torch.nn.Module, decay: float = 0.996, average_buffers: bool = True
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.student = student
        self.teacher = teacher.requires_grad_(False)
        self.decay = decay
        self.average_buffers = average_buffers
        student_params = dict(_unwrap(student).named_parameters())
        teacher_params = dict(teacher.named_parameters())
        if student_params.keys() != teacher_params.keys():
            raise ValueError("EMATeacher: the teacher's parameters do not match the student's")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def ratio(self, iteration: int) -> float:
        """EMA ratio after the 1-based engine ``iteration`` (i.e. 0-based step ``iteration - 1``)."""
        return min(1.0 - 1.0 / iteration, self.decay)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        weight = 1.0 - self.ratio(iteration)
        student = _unwrap(self.student)
        torch._foreach_lerp_(list(self.teacher.parameters()), [p.detach() for p in student.parameters()], weight)
        if not self.average_buffers:
            return
        for b_t, b_s in zip(self.teacher.buffers(), student.buffers()):
            if b_t.is_floating_point():
                b_t.lerp_(b_s, weight)
            else:
                b_t.copy_(b_s)

    def __call__(self, engine: Engine) -> None:
        self.update(engine.state.iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.decay = state.get("decay", self.decay)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
