"""The assembled VESSA model on tiny random SAM2 and Qwen3-VL parts: shapes, prompts, multi-class output, gradients."""

from __future__ import annotations

import pytest
import torch

from vessa_components.networks import Qwen3VLPrompter, Sam2Parts, build_sam2_model
from vessa_components.networks.vessa import VessaModel, boxes_from_masks

CLASSES = ["right_ventricle", "myocardium", "left_ventricle"]


@pytest.fixture(scope="module")
def model() -> VessaModel:
    torch.manual_seed(0)
    sam2 = Sam2Parts(build_sam2_model(preset="tiny_cpu"))
    prompter = Qwen3VLPrompter(train_vlm="frozen", out_dim=sam2.prompt_embed_dim)
    return VessaModel(sam2, prompter, CLASSES, modality="MRI")


def _inputs(batch=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, size, size, generator=g)
    templates = torch.rand(batch, 1, size, size, generator=g)
    masks = torch.zeros(batch, 1, size, size)
    masks[:, :, 40:80, 50:90] = 1
    return images, templates, masks


def test_forward_shapes_and_lm_loss(model):
    images, templates, masks = _inputs()
    out = model(images, templates, masks, torch.tensor([0, 2]))
    assert out["logits"].shape == (2, 1, 128, 128) and out["low_res_logits"].shape == (2, 1, 32, 32)
    assert torch.isfinite(out["lm_loss"])


def test_template_mask_and_prompts_change_the_prediction(model):
    model.eval()
    images, templates, masks = _inputs()
    classes = torch.tensor([1, 1])
    with torch.no_grad():
        base = model(images, templates, masks, classes)["logits"]
        other_template = model(images, templates, torch.zeros_like(masks), classes)["logits"]
        with_mask = model(images, templates, masks, classes, mask_prompts=masks * 20 - 10)["logits"]
        boxes, present = boxes_from_masks(masks)
        with_box = model(images, templates, masks, classes, boxes=boxes)["logits"]
    assert present.all() and boxes[0].tolist() == [50.0, 40.0, 90.0, 80.0]
    for changed in (other_template, with_mask, with_box):
        assert not torch.allclose(base, changed)


def test_segment_classes_and_pseudo_labels(model):
    images, templates, masks = _inputs(batch=2)
    c = len(CLASSES)
    template_images = templates[:, None].expand(-1, c, -1, -1, -1)
    template_masks = masks[:, None].expand(-1, c, -1, -1, -1)
    probabilities = model.segment_classes(images, template_images, template_masks)
    assert probabilities.shape == (2, c + 1, 128, 128)
    assert torch.allclose(probabilities[:, 0], 1 - probabilities[:, 1:].amax(dim=1))
    labels, confidence = model.pseudo_label(images, template_images, template_masks)
    assert labels.shape == confidence.shape == (2, 128, 128)
    assert labels.max() <= c and ((confidence >= 0) & (confidence <= 1)).all()


def test_gradients_reach_decoder_memory_and_prompt_mlp_not_frozen_vlm(model):
    model.train()
    model.zero_grad()
    images, templates, masks = _inputs()
    out = model(images, templates, masks, torch.tensor([0, 1]))
    torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], masks).backward()
    assert model.sam2.sam_mask_decoder.output_upscaling[0].weight.grad is not None
    assert any(p.grad is not None for p in model.sam2.memory_attention.parameters())
    assert all(p.grad is not None for p in model.prompter.text_hidden_fcs.parameters())
    assert all(p.grad is None for p in model.prompter.vlm.parameters())


def test_wrong_sizes_are_rejected(model):
    images, templates, masks = _inputs(size=96)
    with pytest.raises(ValueError, match="128 x 128"):
        model(images, templates, masks, torch.tensor([0, 1]))
    sam2 = model.sam2
    with pytest.raises(ValueError, match="out_dim"):
        VessaModel(sam2, Qwen3VLPrompter(train_vlm="off", class_names=CLASSES, out_dim=64), CLASSES)
