"""Tests of the Stage-2 students: SSL4MIS's UNet and UniMatch V2's DINOv2 + DPT, with complementary dropout."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from vessa_components.networks.dino_dpt import DinoDPT
from vessa_components.networks.unet import UNet, complementary_channel_scales


def _capture_inputs(module: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, comp_drop: bool, seed: int):
    """The first positional input ``module`` receives during ``model(x, comp_drop=comp_drop)`` under ``seed``."""
    captured = []
    handle = module.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    torch.manual_seed(seed)
    model(x, comp_drop=comp_drop)
    handle.remove()
    return captured[0]


def _channel_keep_masks(reference: torch.Tensor, dropped: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Which channels each sample keeps (scaled by 2) after complementary dropout, checking each one is either kept
    or zeroed entirely.

    Returns:
        a ``(batch, channels)`` boolean tensor.
    """
    channels = reference.shape[channel_dim]
    reference = reference.movedim(channel_dim, -1).reshape(reference.shape[0], -1, channels)
    dropped = dropped.movedim(channel_dim, -1).reshape(dropped.shape[0], -1, channels)
    kept = torch.isclose(dropped, 2 * reference, rtol=1e-5, atol=1e-6).all(dim=1)
    zeroed = (dropped == 0).all(dim=1)
    assert not (kept & zeroed).any(), "a reference channel is all zero: the test input cannot tell kept from dropped"
    assert (kept | zeroed).all(), "some channels are neither kept-and-doubled nor zeroed"
    return kept


def _assert_complementary(kept: torch.Tensor) -> None:
    """Every channel is kept in exactly one of the two views of each pair."""
    pairs = kept.shape[0] // 2
    assert torch.equal(kept[:pairs], ~kept[pairs:])


# --------------------------------------------------------------------------------------------------- shared helper


@pytest.mark.parametrize("exact_half", [True, False])
def test_complementary_channel_scales_leave_the_requested_pairs_intact(exact_half):
    torch.manual_seed(0)
    scales = complementary_channel_scales(6, 10, exact_half, 0.5, torch.zeros(1, dtype=torch.float16))
    assert scales.shape == (12, 10) and scales.dtype == torch.float16
    first, second = scales[:6].float(), scales[6:].float()
    assert torch.equal(first + second, torch.full_like(first, 2.0))
    intact = (first == 1).all(dim=1)
    assert intact.sum() == 3  # UniMatch V2: int(pairs * (1 - 0.5)) pairs keep everything
    assert set(first[~intact].unique().tolist()) <= {0.0, 2.0}
    if exact_half:
        assert ((first[~intact] == 2).sum(dim=1) == 5).all()


# ------------------------------------------------------------------------------------------------------------ UNet


def test_unet_has_the_published_parameter_count():
    num_parameters = sum(p.numel() for p in UNet(in_channels=1, out_channels=4).parameters())
    assert abs(num_parameters - 1.81e6) / 1.81e6 < 0.02


@pytest.mark.parametrize("upsample", ["bilinear", "transposed"])
@pytest.mark.parametrize("size", [(33, 47), (48, 48)])
def test_unet_output_has_the_input_size(upsample, size):
    net = UNet(in_channels=2, out_channels=3, upsample=upsample).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 2, *size)).shape == (2, 3, *size)


def test_unet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="upsample"):
        UNet(upsample="nearest")
    with pytest.raises(ValueError, match="one entry per encoder level"):
        UNet(features=(16, 32, 64), dropout=(0.1, 0.2))
    with pytest.raises(ValueError, match="comp_drop_pair_fraction"):
        UNet(comp_drop_pair_fraction=1.5)
    with pytest.raises(ValueError, match="even size"):
        UNet().train()(torch.randn(3, 1, 32, 32), comp_drop=True)


def test_unet_comp_drop_masks_every_decoder_input_complementarily():
    torch.manual_seed(0)
    net = UNet(comp_drop_pair_fraction=1.0).train()
    views = torch.randn(6, 1, 20, 36)  # [s1; s2] of three pairs; 20 x 36 is padded to 32 x 48
    reference = _capture_inputs(net.decoder, net, views, comp_drop=False, seed=1)
    dropped = _capture_inputs(net.decoder, net, views, comp_drop=True, seed=1)
    assert len(dropped) == 5  # four skip features and the bottleneck
    for level_reference, level_dropped in zip(reference, dropped):
        kept = _channel_keep_masks(level_reference, level_dropped, channel_dim=1)
        _assert_complementary(kept)
        channels = level_reference.shape[1]
        assert (kept[:3].sum(dim=1) == channels // 2).all()


def test_unet_comp_drop_default_leaves_half_of_the_pairs_intact():
    torch.manual_seed(0)
    net = UNet().train()
    views = torch.randn(8, 1, 16, 16)
    reference = _capture_inputs(net.decoder, net, views, comp_drop=False, seed=2)[-1]
    dropped = _capture_inputs(net.decoder, net, views, comp_drop=True, seed=2)[-1]
    intact_first = [torch.equal(reference[i], dropped[i]) for i in range(4)]
    intact_second = [torch.equal(reference[i + 4], dropped[i + 4]) for i in range(4)]
    assert intact_first == intact_second and sum(intact_first) == 2


def test_unet_comp_drop_is_ignored_in_eval_mode():
    net = UNet().eval()
    views = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(views, comp_drop=True), net(views))


@pytest.mark.parametrize("comp_drop", [False, True])
def test_unet_gradients_reach_every_parameter(comp_drop):
    net = UNet(comp_drop_pair_fraction=1.0).train()
    net(torch.randn(4, 1, 18, 14), comp_drop=comp_drop).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_unet_torchscript_matches_eager():
    net = UNet().eval()
    scripted = torch.jit.script(net)
    image = torch.randn(2, 1, 20, 36)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), net(image))
    scripted.train()
    assert scripted(torch.randn(4, 1, 16, 16), True).shape == (4, 4, 16, 16)


# --------------------------------------------------------------------------------------------------- DINOv2 + DPT


def _tiny_dinov2(hidden_size: int = 48, num_heads: int = 3) -> Dinov2Model:
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=hidden_size, num_hidden_layers=4, num_attention_heads=num_heads))


@pytest.mark.parametrize("size", [(100, 90), (14, 29)])
def test_dino_dpt_output_has_the_input_size(size):
    net = DinoDPT(out_channels=3, backbone_size="tiny").eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, *size)).shape == (2, 3, *size)


def test_dino_dpt_loads_a_saved_backbone(tmp_path):
    saved = _tiny_dinov2()
    saved.save_pretrained(tmp_path)
    net = DinoDPT(out_channels=4, backbone_size="tiny", pretrained_path=tmp_path).eval()
    loaded = net.backbone.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded[name], value), name
    with torch.no_grad():
        assert net(torch.rand(1, 1, 100, 90)).shape == (1, 4, 100, 90)


def test_dino_dpt_reports_bad_pretrained_paths(tmp_path):
    missing = tmp_path / "no_such_dinov2"
    with pytest.raises(FileNotFoundError, match="no_such_dinov2"):
        DinoDPT(backbone_size="tiny", pretrained_path=missing)
    _tiny_dinov2(hidden_size=32, num_heads=2).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match="narrow.*hidden size 32"):
        DinoDPT(backbone_size="tiny", pretrained_path=tmp_path / "narrow")


def test_dino_dpt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backbone_size"):
        DinoDPT(backbone_size="huge")
    with pytest.raises(ValueError, match="intermediate_layers"):
        DinoDPT(backbone_size="tiny", intermediate_layers=(0, 1, 2, 4))
    with pytest.raises(ValueError, match="in_channels"):
        DinoDPT(backbone_size="tiny", in_channels=2)


def test_dino_dpt_custom_depth_reads_the_ends_of_its_quarters():
    net = DinoDPT(backbone_size="tiny", num_layers=8, hidden_size=32, num_heads=2)
    assert net.intermediate_layers == (1, 3, 5, 7)
    assert net.backbone.config.hidden_size == 32


def test_dino_dpt_normalises_after_the_channel_repeat():
    torch.manual_seed(0)
    plain = DinoDPT(backbone_size="tiny", in_channels=3).eval()
    normalising = DinoDPT(backbone_size="tiny", image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 2.0)).eval()
    normalising.load_state_dict(plain.state_dict())
    image = torch.rand(1, 1, 28, 28)
    expected_input = (image.expand(-1, 3, -1, -1) - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor(
        [0.5, 0.25, 2.0]
    )[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(normalising(image), plain(expected_input))


def test_dino_dpt_comp_drop_shares_one_complementary_mask_across_layers():
    torch.manual_seed(0)
    net = DinoDPT(backbone_size="tiny", comp_drop_pair_fraction=1.0).train()
    views = torch.randn(4, 1, 28, 30)
    reference = _capture_inputs(net.head, net, views, comp_drop=False, seed=3)
    dropped = _capture_inputs(net.head, net, views, comp_drop=True, seed=3)
    masks = [_channel_keep_masks(r, d, channel_dim=2) for r, d in zip(reference, dropped)]
    _assert_complementary(masks[0])
    for mask in masks[1:]:
        assert torch.equal(mask, masks[0])
    # binomial masks (UniMatch V2) need not keep exactly half, but keep some and drop some of 48 channels
    assert (masks[0].sum(dim=1) > 0).all() and (masks[0].sum(dim=1) < 48).all()


def test_dino_dpt_comp_drop_is_ignored_in_eval_mode_and_gradients_flow():
    net = DinoDPT(backbone_size="tiny").eval()
    views = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net(views, comp_drop=True), net(views))
    net.train()
    net(views, comp_drop=True).square().mean().backward()
    # the mask token only serves masked-image pre-training
    missing = [
        name
        for name, p in net.named_parameters()
        if name != "backbone.embeddings.mask_token" and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing
