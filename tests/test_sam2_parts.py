"""Tests of the SAM2 parts of VESSA: building SAM2 from its configs, checkpoints, and each model part."""

from __future__ import annotations

import pytest
import torch
from sam2.modeling.sam2_base import SAM2Base

from vessa_components.networks.sam2_parts import Sam2Parts, build_sam2_model, count_parameters

IMAGE_SIZE = 128  # the tiny_cpu preset's
BATCH = 2


@pytest.fixture(scope="module")
def tiny_sam2() -> SAM2Base:
    torch.manual_seed(0)
    return build_sam2_model(preset="tiny_cpu")


@pytest.fixture(scope="module")
def tiny_parts(tiny_sam2) -> Sam2Parts:
    return Sam2Parts(tiny_sam2)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    template = torch.rand(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    template_mask = torch.zeros(BATCH, 1, IMAGE_SIZE, IMAGE_SIZE)
    template_mask[:, :, 32:96, 40:80] = 1.0
    return {"target": target, "template": template, "template_mask": template_mask}


def _predict(parts: Sam2Parts, images: dict[str, torch.Tensor], **prompts) -> dict[str, torch.Tensor]:
    """The whole reference-guided prediction: encode both images, write the template memory, condition, decode."""
    target = parts.encode_image(images["target"])
    template = parts.encode_image(images["template"])
    memory, memory_pos = parts.encode_memory(template["image_embedding"], images["template_mask"])
    conditioned = parts.condition_on_memory(target["image_embedding"], memory, memory_pos)
    return parts.decode_masks(conditioned, target["high_res_features"], **prompts)


def test_shapes_through_each_part(tiny_parts, images):
    dim = tiny_parts.prompt_embed_dim
    grid = IMAGE_SIZE // 16
    with torch.no_grad():
        encoded = tiny_parts.encode_image(images["target"])
        rgb = tiny_parts.encode_image(images["target"].repeat(1, 3, 1, 1))
        memory, memory_pos = tiny_parts.encode_memory(encoded["image_embedding"], images["template_mask"])
        conditioned = tiny_parts.condition_on_memory(encoded["image_embedding"], memory, memory_pos)
        decoded = tiny_parts.decode_masks(conditioned, encoded["high_res_features"], torch.randn(BATCH, 1, dim))

    assert dim == 32
    assert encoded["image_embedding"].shape == (BATCH, dim, grid, grid)
    assert encoded["image_pos"].shape == (BATCH, dim, grid, grid)
    assert [f.shape for f in encoded["high_res_features"]] == [
        (BATCH, dim // 8, IMAGE_SIZE // 4, IMAGE_SIZE // 4),
        (BATCH, dim // 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8),
    ]
    torch.testing.assert_close(encoded["pooled"], encoded["image_embedding"].mean(dim=(2, 3)))
    torch.testing.assert_close(rgb["image_embedding"], encoded["image_embedding"])
    assert memory.shape == memory_pos.shape == (BATCH, 16, grid, grid)
    assert conditioned.shape == (BATCH, dim, grid, grid)
    assert decoded["low_res_logits"].shape == (BATCH, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert decoded["logits"].shape == (BATCH, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert decoded["iou"].shape == decoded["object_score_logits"].shape == (BATCH, 1)


def test_gradients_reach_every_trained_part(images):
    torch.manual_seed(0)
    parts = Sam2Parts(build_sam2_model(preset="tiny_cpu")).train()
    seg_token = torch.randn(BATCH, 1, parts.prompt_embed_dim, requires_grad=True)
    _predict(parts, images, prompt_tokens=seg_token)["logits"].square().mean().backward()

    assert seg_token.grad is not None and seg_token.grad.abs().sum() > 0
    for name in ("sam_mask_decoder", "memory_attention", "memory_encoder", "image_encoder"):
        grads = [p.grad for p in getattr(parts, name).parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, name
    assert parts.maskmem_tpos_enc.grad.abs().sum() > 0


def test_mask_prompt_and_box_change_the_mask(tiny_parts, images):
    mask_prompt = torch.full((BATCH, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4), -10.0)
    mask_prompt[:, :, 8:24, 10:20] = 10.0
    box = torch.tensor([[40.0, 32.0, 80.0, 96.0]]).repeat(BATCH, 1)
    with torch.no_grad():
        plain = _predict(tiny_parts, images)["logits"]
        with_mask = _predict(tiny_parts, images, mask_prompt=mask_prompt)["logits"]
        with_full_size_mask = _predict(tiny_parts, images, mask_prompt=images["template_mask"] * 20 - 10)["logits"]
        with_box = _predict(tiny_parts, images, boxes=box)["logits"]

    assert not torch.allclose(plain, with_mask, atol=1e-4)
    assert not torch.allclose(plain, with_full_size_mask, atol=1e-4)
    assert not torch.allclose(plain, with_box, atol=1e-4)


def test_memory_follows_the_template_mask(tiny_parts, images):
    with torch.no_grad():
        template = tiny_parts.encode_image(images["template"])["image_embedding"]
        target = tiny_parts.encode_image(images["target"])["image_embedding"]
        memory, memory_pos = tiny_parts.encode_memory(template, images["template_mask"])
        from_logits, _ = tiny_parts.encode_memory(template, images["template_mask"] * 40 - 20, masks_are_logits=True)
        other_mask = images["template_mask"].flip(-1).transpose(-1, -2)
        other_memory, _ = tiny_parts.encode_memory(template, other_mask)
        conditioned = tiny_parts.condition_on_memory(target, memory, memory_pos)
        conditioned_other = tiny_parts.condition_on_memory(target, other_memory, memory_pos)
        without_memory = tiny_parts.condition_on_memory(target, None)

    torch.testing.assert_close(from_logits, memory, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conditioned, conditioned_other, atol=1e-4)
    torch.testing.assert_close(without_memory, target + tiny_parts.no_mem_embed.view(1, -1, 1, 1))


def test_empty_template_mask_adds_the_no_object_embedding(images):
    parts = Sam2Parts(build_sam2_model(preset="tiny_cpu"))
    with torch.no_grad():
        parts.no_obj_embed_spatial.fill_(1000.0)
        template = parts.encode_image(images["template"])["image_embedding"]
        masks = images["template_mask"].clone()
        masks[0] = 0.0  # the first template does not show the class
        memory, _ = parts.encode_memory(template, masks)

    assert memory[0].mean() > 500.0
    assert memory[1].abs().mean() < 100.0


def test_parts_state_dict_is_a_subset_of_sam2s(tiny_sam2, tiny_parts):
    parts_keys = set(tiny_parts.state_dict())
    assert parts_keys < set(tiny_sam2.state_dict())
    assert {"maskmem_tpos_enc", "no_mem_embed", "no_obj_embed_spatial"} <= parts_keys


def test_checkpoint_round_trip(tmp_path, tiny_sam2):
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": tiny_sam2.state_dict()}, path)
    loaded = build_sam2_model(preset="tiny_cpu", checkpoint=path)
    for name, value in tiny_sam2.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_checkpoint_with_renamed_key_is_rejected(tmp_path, tiny_sam2):
    state = dict(tiny_sam2.state_dict())
    state["no_mem_embed_renamed"] = state.pop("no_mem_embed")
    path = tmp_path / "renamed.pt"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as error:
        build_sam2_model(preset="tiny_cpu", checkpoint=path)
    message = str(error.value)
    for part in (str(path), "sam2.1_hiera_t.yaml", "'no_mem_embed'", "'no_mem_embed_renamed'"):
        assert part in message


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    other = build_sam2_model(preset="tiny_cpu", overrides=["++model.memory_attention.layer.dim_feedforward=16"])
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(ValueError, match="does not match the model built from configs/sam2.1/sam2.1_hiera_t.yaml"):
        build_sam2_model(preset="tiny_cpu", checkpoint=path)


def test_unreadable_or_foreign_checkpoints_are_rejected(tmp_path, tiny_sam2):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_sam2_model(preset="tiny_cpu", checkpoint=missing)

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read SAM2 checkpoint .*notes.pt"):
        build_sam2_model(preset="tiny_cpu", checkpoint=text)

    flat = tmp_path / "flat.pt"
    torch.save(tiny_sam2.state_dict(), flat)
    with pytest.raises(ValueError, match="flat.pt is not in SAM2's format"):
        build_sam2_model(preset="tiny_cpu", checkpoint=flat)


def test_bad_sizes_and_presets_are_rejected(tiny_parts):
    with pytest.raises(ValueError, match="image size 112 .* multiple of 32"):
        build_sam2_model(preset="tiny_cpu", image_size=112)
    with pytest.raises(ValueError, match="unknown SAM2 preset 'huge'"):
        build_sam2_model(preset="huge")
    with pytest.raises(ValueError, match="takes 128x128 images"):
        tiny_parts.encode_image(torch.rand(1, 1, 96, 96))
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        tiny_parts.encode_image(torch.rand(1, 2, IMAGE_SIZE, IMAGE_SIZE))


def test_other_image_size_runs():
    parts = Sam2Parts(build_sam2_model(preset="tiny_cpu", image_size=96))
    with torch.no_grad():
        encoded = parts.encode_image(torch.rand(1, 1, 96, 96))
        decoded = parts.decode_masks(encoded["image_embedding"], encoded["high_res_features"])
    assert decoded["logits"].shape == (1, 1, 96, 96)


def test_full_preset_is_sam2_1_hiera_tiny():
    assert count_parameters(build_sam2_model(preset="full")) == pytest.approx(38.96e6, rel=1e-3)


def test_parts_match_sam2s_own_methods(images):
    """Each part gives what ``SAM2Base`` computes for a conditioning frame and the frame after it.

    Two SAM2 video-tracking steps that VESSA leaves out are switched off in the reference: cross-attention to object
    pointers, and replacing the masks of samples scored object-free by a constant (Sam2Parts returns the score).
    """
    sam2 = build_sam2_model(preset="tiny_cpu")
    parts = Sam2Parts(sam2)
    sam2.use_obj_ptrs_in_encoder = False
    sam2.pred_obj_scores = False
    mask_logits = images["template_mask"] * 40 - 20
    mask_logits[0] = -20.0  # an empty template, to cover the no-object embedding
    mask_prompt = torch.randn(BATCH, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    with torch.no_grad():
        encoded = parts.encode_image(images["target"])
        memory, memory_pos = parts.encode_memory(encoded["image_embedding"], mask_logits, masks_are_logits=True)
        conditioned = parts.condition_on_memory(encoded["image_embedding"], memory, memory_pos)
        decoded = parts.decode_masks(conditioned, encoded["high_res_features"], mask_prompt=mask_prompt)

        normalised = (images["target"].repeat(1, 3, 1, 1) - parts.pixel_mean) / parts.pixel_std
        _, feats, pos, sizes = sam2._prepare_backbone_features(sam2.forward_image(normalised))
        object_scores = (mask_logits.flatten(1) > 0).any(dim=1, keepdim=True).float() * 20 - 10
        ref_memory, ref_memory_pos = sam2._encode_new_memory(feats, sizes, mask_logits, object_scores, False)
        template_frame = {"maskmem_features": ref_memory, "maskmem_pos_enc": ref_memory_pos}
        history = {"cond_frame_outputs": {0: template_frame}, "non_cond_frame_outputs": {}}
        ref_conditioned = sam2._prepare_memory_conditioned_features(
            1, False, feats[-1:], pos[-1:], sizes[-1:], history, 2
        )
        ref_low_res = sam2._forward_sam_heads(
            ref_conditioned, mask_inputs=mask_prompt, high_res_features=encoded["high_res_features"]
        )[0]

    torch.testing.assert_close(encoded["image_embedding"].flatten(2).permute(2, 0, 1), feats[-1])
    torch.testing.assert_close(memory, ref_memory)
    torch.testing.assert_close(memory_pos, ref_memory_pos[-1])
    torch.testing.assert_close(conditioned, ref_conditioned)
    torch.testing.assert_close(decoded["low_res_logits"], ref_low_res)
