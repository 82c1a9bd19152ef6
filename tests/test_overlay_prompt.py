"""TemplateOverlay(d): colours, contour, range and errors; the prompt text of a VESSA query."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from vessa_components.templates import DEFAULT_ANSWER, DEFAULT_PROMPT_TEMPLATE, SEG_TOKEN, build_prompt
from vessa_components.transforms.overlay import TemplateOverlay, TemplateOverlayd


def gradient_and_square() -> tuple[torch.Tensor, torch.Tensor]:
    """A 12x12 horizontal grey ramp and a 6x6 square mask at rows/columns 3..8."""
    image = torch.linspace(0.0, 1.0, 12).repeat(12, 1)[None]
    mask = torch.zeros(1, 12, 12)
    mask[:, 3:9, 3:9] = 1
    return image, mask


def test_overlay_blends_the_mask_and_draws_its_contour() -> None:
    image, mask = gradient_and_square()
    overlay = TemplateOverlay()(image, mask)
    assert overlay.shape == (3, 12, 12) and overlay.dtype == torch.float32
    assert 0.0 <= float(overlay.min()) and float(overlay.max()) <= 1.0
    outside = mask[0] == 0
    for channel in range(3):
        assert torch.equal(overlay[channel][outside], image[0][outside])  # unchanged grey outside
    contour = torch.zeros(12, 12, dtype=torch.bool)
    contour[3:9, 3:9] = True
    contour[4:8, 4:8] = False
    red = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(overlay[:, contour].T, red.expand(int(contour.sum()), 3))  # opaque outline
    interior = overlay[:, 4:8, 4:8]
    expected = 0.5 * image[:, 4:8, 4:8].expand(3, -1, -1) + 0.5 * red.view(3, 1, 1)
    assert torch.allclose(interior, expected)
    assert (interior[0] > interior[1]).all() and torch.equal(interior[1], interior[2])  # reddish


def test_overlay_options() -> None:
    image, mask = gradient_and_square()
    filled = TemplateOverlay(color=(0.0, 1.0, 0.0), alpha=1.0, contour=False)(image, mask)
    assert torch.equal(filled[:, 3:9, 3:9], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 6, 6))
    outline_only = TemplateOverlay(alpha=0.0, contour_width=2)(image, mask)
    assert torch.equal(outline_only[:, 5:7, 5:7], image[:, 5:7, 5:7].expand(3, -1, -1))  # inside the 2-px outline
    assert torch.equal(outline_only[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    # a mask touching the image border is outlined along the border too; out-of-range intensities are clipped
    edge = torch.zeros(1, 12, 12)
    edge[:, :, :4] = 1
    bright = TemplateOverlay()(image * 3 - 1, edge)
    assert torch.equal(bright[:, 5, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert 0.0 <= float(bright.min()) and float(bright.max()) <= 1.0
    # numpy and MetaTensor inputs, non-binary masks count as inside
    from_numpy = TemplateOverlay()(image.numpy(), (mask * 3).numpy().astype(np.uint8))
    from_meta = TemplateOverlay()(MetaTensor(image), MetaTensor(mask))
    assert torch.equal(from_numpy, TemplateOverlay()(image, mask)) and torch.equal(from_meta, from_numpy)


def test_overlay_errors() -> None:
    image, mask = gradient_and_square()
    with pytest.raises(ValueError, match="color"):
        TemplateOverlay(color=(1.0, 0.0))
    with pytest.raises(ValueError, match="color"):
        TemplateOverlay(color=(255, 0, 0))
    with pytest.raises(ValueError, match="alpha"):
        TemplateOverlay(alpha=1.5)
    with pytest.raises(ValueError, match="contour_width"):
        TemplateOverlay(contour_width=0)
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        TemplateOverlay()(image.expand(3, -1, -1), mask)
    with pytest.raises(ValueError, match="differs"):
        TemplateOverlay()(image, mask[:, :10])


def test_overlay_dict_wrapper() -> None:
    image, mask = gradient_and_square()
    data = {"template_image": image, "template_mask": mask, "image": torch.zeros(1, 4, 4)}
    out = TemplateOverlayd(color=(0.0, 0.0, 1.0))(data)
    assert torch.equal(out["template_overlay"], TemplateOverlay(color=(0.0, 0.0, 1.0))(image, mask))
    assert out["image"] is data["image"] and "template_overlay" not in data
    custom = TemplateOverlayd("ref", "ref_mask", "ref_rgb", alpha=0.2)({"ref": image, "ref_mask": mask})
    assert custom["ref_rgb"].shape == (3, 12, 12)
    with pytest.raises(KeyError):
        TemplateOverlayd()({"template_image": image})
    assert "template_overlay" not in TemplateOverlayd(allow_missing_keys=True)({"template_image": image})


def test_prompt_text() -> None:
    assert build_prompt("left_ventricle", "MRI") == (
        "Image 1 is a MRI slice. Image 2 shows a reference MRI slice with the left ventricle outlined. "
        "Segment the left ventricle in image 1."
    )
    assert build_prompt("liver", "CT", template="Segment the {class} ({modality}), {{literal}}.") == (
        "Segment the liver (CT), {literal}."
    )
    assert build_prompt("right__ventricle_", "MRI", template="{class}|") == "right ventricle|"
    assert DEFAULT_ANSWER == "Sure, <SEG>." and SEG_TOKEN in DEFAULT_ANSWER
    assert DEFAULT_PROMPT_TEMPLATE.count("{class}") == 2
    with pytest.raises(ValueError, match=r"unknown placeholder.*'organ'"):
        build_prompt("liver", "CT", template="Segment the {organ}.")
    with pytest.raises(ValueError, match="unknown placeholder"):
        build_prompt("liver", "CT", template="Segment the {}.")
    with pytest.raises(ValueError, match="malformed"):
        build_prompt("liver", "CT", template="Segment the {class.")
