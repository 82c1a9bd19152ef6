"""Run by ``torchrun --nproc_per_node=2`` from ``test_mutual_learning.py``: one mutual-learning step in two real
gloo processes, where only rank 0's teacher is confident. Each rank writes the decoder's parameters before and after
the step to ``<out_dir>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vessa_components.data import ACDC_CLASS_NAMES, make_slice_datalist
from vessa_components.engines import VessaPseudoLabeler
from vessa_components.networks import VessaSegmenter, build_vessa_model
from vessa_components.templates import TemplateBank

SIZE = 64


def _flat_decoder(labeler: VessaPseudoLabeler) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in labeler.segmenter.model.sam2.sam_mask_decoder.parameters()])


def main(acdc_root: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same VESSA on every rank, as a loaded checkpoint gives
    datalist = make_slice_datalist(Path(acdc_root), labeled_cases=1)
    model = build_vessa_model(ACDC_CLASS_NAMES[1:], train_vlm="off", sam2_preset="tiny_cpu", image_size=SIZE)
    bank = TemplateBank.from_datalist(datalist["labeled"][::3], "acdc", "MRI", ACDC_CLASS_NAMES, image_size=SIZE)
    labeler = VessaPseudoLabeler(VessaSegmenter(model, bank), refresh_interval=100, mutual_learning=True)

    torch.manual_seed(1 + rank)  # each rank its own unlabelled slices
    images = torch.rand(2, 1, SIZE, SIZE)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    labels[:, 20:40, 20:40] = 3
    confidence = 0.98 if rank == 0 else 0.5  # rank 1 has no pixel above mutual_learning_conf_thresh
    other = (1.0 - confidence) / 3
    teacher = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * (confidence - other) + other

    before = _flat_decoder(labeler).clone()
    result = labeler.learn_from_teacher(images, teacher)
    torch.save({"before": before, "after": _flat_decoder(labeler), "result": result,
                "steps": labeler.mutual_learning_steps}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
