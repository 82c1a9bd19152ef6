"""VESSA in Stage 2: view-to-reference pixel maps, the cached pseudo-labeler with feedback, the trainer's VESSA term."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose, CopyItemsd, EnsureChannelFirstd, RandAxisFlipd, RandRotate90d, RandRotated, Resized
from torch.utils.data import DataLoader

from vessa_components.data import ACDC_CLASS_NAMES, LoadH5d, make_slice_datalist
from vessa_components.engines import UniMatchV2Trainer, VessaPseudoLabeler, unlabeled_data
from vessa_components.handlers import EMATeacher
from vessa_components.networks import UNet
from vessa_components.networks.vessa import VessaSegmenter, build_vessa_model
from vessa_components.templates import TemplateBank
from vessa_components.transforms import ViewToReferenced, warp_to_view

SIZE = 64


@pytest.fixture(scope="module")
def datalist(acdc_root: Path) -> dict:
    return make_slice_datalist(acdc_root, labeled_cases=1)


def _views(entry: dict, seed: int, rotate_mode: str = "nearest") -> dict:
    pipeline = Compose(
        [
            LoadH5d("image"),
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Resized("image", (SIZE, SIZE)),
            CopyItemsd("image", names="image_ref"),
            RandRotate90d("image", prob=1.0, max_k=3),
            RandAxisFlipd("image", prob=1.0),
            RandRotated("image", range_x=0.35, prob=1.0, mode=rotate_mode, padding_mode="zeros"),
            ViewToReferenced("image", ref_key="image_ref", names="weak_to_ref"),
        ]
    )
    pipeline.set_random_state(seed)
    return pipeline({"image": entry["image"]})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_slice_warped_onto_the_weak_view_reproduces_it(datalist, seed):
    out = _views(datalist["unlabeled"][40], seed)
    view, reference = out["image"].as_tensor(), out["image_ref"].as_tensor()
    warped = warp_to_view(reference[None], out["weak_to_ref"][None])[0]
    # pixels the rotation brings in from outside the slice are 0 in both (zero padding); elsewhere nearest samples agree
    inside = view != 0
    assert inside.float().mean() > 0.7
    assert torch.allclose(warped[inside], view[inside], atol=1e-5)
    identity = warp_to_view(reference[None], torch.eye(3)[None])[0]
    assert torch.allclose(identity, reference, atol=1e-6)


def test_view_to_reference_needs_affines():
    with pytest.raises(TypeError, match="MetaTensor"):
        ViewToReferenced("image", ref_key="ref", names="m")({"image": torch.zeros(1, 4, 4), "ref": torch.zeros(1, 4, 4)})


@pytest.fixture(scope="module")
def segmenter(datalist) -> VessaSegmenter:
    torch.manual_seed(0)
    model = build_vessa_model(ACDC_CLASS_NAMES[1:], train_vlm="off", sam2_preset="tiny_cpu", image_size=SIZE)
    bank = TemplateBank.from_datalist(datalist["labeled"][::3], "acdc", "MRI", ACDC_CLASS_NAMES, image_size=SIZE)
    return VessaSegmenter(model, bank)


def _slices(datalist, indices) -> tuple[list[str], torch.Tensor]:
    items = [_views(datalist["unlabeled"][i], 0) for i in indices]
    return [datalist["unlabeled"][i]["image"] for i in indices], torch.stack([d["image_ref"].as_tensor() for d in items])


def test_labeler_caches_refreshes_and_feeds_the_teacher_back(datalist, segmenter):
    calls: list[tuple] = []
    hook = segmenter.register_forward_hook(lambda module, args, output: calls.append(args))
    try:
        labeler = VessaPseudoLabeler(segmenter, refresh_interval=5, feedback_start=10)
        ids, images = _slices(datalist, [3, 30])
        teacher_calls: list[int] = []

        def teacher(x: torch.Tensor) -> torch.Tensor:
            teacher_calls.append(x.shape[0])
            probs = torch.zeros(x.shape[0], 4, *x.shape[-2:])
            probs[:, 0] = 1.0
            probs[:, 0, 20:40, 20:40], probs[:, 3, 20:40, 20:40] = 0.0, 1.0
            return probs

        labels, confidence = labeler(ids, images, iteration=1, teacher=teacher)
        assert labels.shape == confidence.shape == (2, SIZE, SIZE) and labels.dtype == torch.long
        assert int(labels.max()) <= 3 and 0.0 <= float(confidence.min()) and float(confidence.max()) <= 1.0
        assert (labeler.misses, labeler.hits, len(labeler)) == (2, 0, 2) and len(calls) == 1
        assert calls[0][1] is None and teacher_calls == []  # no feedback before feedback_start

        again, _ = labeler(ids, images, iteration=3, teacher=teacher)
        assert torch.equal(again, labels) and labeler.hits == 2 and len(calls) == 1

        new_ids, new_images = _slices(datalist, [3, 55])  # one cached, one new
        labeler(new_ids, new_images, iteration=4, teacher=teacher)
        assert labeler.hits == 3 and labeler.misses == 3 and calls[-1][0].shape[0] == 1

        labeler(ids, images, iteration=6, teacher=teacher)  # 5 iterations old: refreshed
        assert labeler.misses == 5

        labeler(ids, images, iteration=10, teacher=teacher)  # feedback starts: entries without it are stale
        assert labeler.misses == 7 and teacher_calls == [2]
        mask_prompts, boxes = calls[-1][1], calls[-1][2]
        assert mask_prompts.shape == (2, 3, 1, SIZE, SIZE) and boxes.shape == (2, 3, 4)
        assert torch.equal(boxes[0, 2], torch.tensor([20.0, 20.0, 40.0, 40.0]))  # the teacher's LV box
        assert torch.equal(boxes[0, 0], torch.tensor([0.0, 0.0, SIZE, SIZE]))  # no RV: the whole slice
        assert labeler.hit_rate == pytest.approx(labeler.hits / (labeler.hits + labeler.misses))
    finally:
        hook.remove()


def _unlabeled_items(datalist, indices) -> list[dict]:
    items = []
    for entry in unlabeled_data("vessa", [datalist["unlabeled"][i] for i in indices]):
        views = _views(entry, 0, rotate_mode="bilinear")
        weak = views["image"].as_tensor()
        box = torch.zeros(1, SIZE, SIZE)
        box[:, 8:24, 8:24] = 1
        items.append(
            {
                "id": entry["id"],
                "image": weak,
                "image_s1": weak * 0.8,
                "image_s2": weak * 1.2,
                "cutmix_box1": box,
                "cutmix_box2": box,
                "image_ref": views["image_ref"].as_tensor(),
                "weak_to_ref": views["weak_to_ref"],
            }
        )
    return items


def _labeled_items(datalist, n=2) -> list[dict]:
    pipeline = Compose(
        [
            LoadH5d(["image", "label"]),
            EnsureChannelFirstd(["image", "label"], channel_dim="no_channel"),
            Resized(["image", "label"], (SIZE, SIZE), mode=["bilinear", "nearest"]),
        ]
    )
    return [{k: v.as_tensor() for k, v in pipeline(e).items() if k in ("image", "label")} for e in datalist["labeled"][:n]]


@pytest.mark.parametrize("fusion", ["separate", "confidence", "agreement"])
def test_trainer_adds_the_vessa_term_and_reuses_the_cache(datalist, segmenter, fusion):
    torch.manual_seed(0)
    student = UNet(in_channels=1, out_channels=4)
    teacher = copy.deepcopy(student)
    labeler = VessaPseudoLabeler(segmenter, refresh_interval=100, feedback_start=2)
    trainer = UniMatchV2Trainer(
        device="cpu",
        max_epochs=1,
        epoch_length=3,
        train_data_loader=DataLoader(_labeled_items(datalist), batch_size=2),
        unlabeled_data_loader=DataLoader(_unlabeled_items(datalist, [5, 25]), batch_size=2),
        network=student,
        teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        conf_thresh=0.5,
        vessa=labeler,
        vessa_conf_thresh=0.5,
        vessa_weight=0.7,
        pseudo_label_fusion=fusion,
        train_handlers=[EMATeacher(student, teacher, decay=0.99)],
    )
    trainer.run()
    out = trainer.state.output
    assert {"loss_v", "mask_ratio_v", "vessa_weight", "vessa_cache_size", "vessa_hit_rate"} <= set(out)
    assert float(out["vessa_cache_size"]) == 2
    # iteration 1 computes both slices, 2 refreshes them with feedback, 3 is served from the cache
    assert (labeler.misses, labeler.hits) == (4, 2)
    expected = (out["loss_x"] + out["loss_u"]) / 2
    if fusion == "separate":
        expected = expected + 0.7 * out["loss_v"]
    assert torch.allclose(out["loss"], expected)


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="unknown pseudo_label_fusion 'vote'"):
        UniMatchV2Trainer(
            device="cpu", max_epochs=1, train_data_loader=[], network=torch.nn.Conv2d(1, 4, 1),
            optimizer=torch.optim.SGD(torch.nn.Conv2d(1, 4, 1).parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
            pseudo_label_fusion="vote",
        )


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant"])
def test_vessa_weight_decays_by_iteration_and_survives_resume(shape):
    from ignite.engine import Engine

    from vessa_components.handlers import VessaWeightSchedule

    schedule = VessaWeightSchedule(start=1.0, end=0.2, decay_iterations=10, shape=shape)
    seen: list[float] = []
    engine = Engine(lambda e, b: seen.append(e.state.vessa_weight))
    schedule.attach(engine)
    engine.run(range(15), max_epochs=1)
    assert seen[0] == 1.0
    if shape == "constant":
        assert set(seen) == {1.0}
        return
    assert seen[10:] == [pytest.approx(0.2)] * 5 and all(a >= b for a, b in zip(seen, seen[1:]))
    midpoint = 0.6 if shape == "linear" else 1.0 - 0.8 * (1 - math.cos(math.pi / 2)) / 2
    assert seen[5] == pytest.approx(midpoint)
    assert schedule.value(6) == seen[5]  # a function of the iteration only: a resumed run continues the curve
    with pytest.raises(ValueError, match="unknown VESSA weight schedule 'step'"):
        VessaWeightSchedule(shape="step")


@pytest.fixture(scope="module")
def foundation_ckpt(tmp_path_factory) -> Path:
    """What a vessa_foundation run with train_vlm=off and image_size 64 leaves in models/model.pt."""
    torch.manual_seed(0)
    model = build_vessa_model(ACDC_CLASS_NAMES[1:], train_vlm="off", sam2_preset="tiny_cpu", image_size=SIZE)
    path = tmp_path_factory.mktemp("foundation") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def _acdc_workflow(output_dir, dataset_dir, **overrides):
    from monai.bundle import ConfigWorkflow

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "vessa_ssl_acdc"
    settings = {
        "roi_size": SIZE, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False,
        "data_layout": "ssl4mis", "labeled_cases": 1, "method": "vessa", "vessa_train_vlm": "off",
        "vessa_sam2_preset": "tiny_cpu", "vessa_image_size": SIZE, **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), workflow_type="train", bundle_root=str(bundle),
        output_dir=str(output_dir), dataset_dir=str(dataset_dir), **settings,
    )
    workflow.initialize()
    return workflow


def test_bundle_trains_with_vessa(tmp_path, acdc_root, foundation_ckpt):
    from ignite.engine import Events

    from .helpers import copy_acdc_subset

    data = copy_acdc_subset(acdc_root, tmp_path / "acdc", ("patient099", "patient038"), slice_step=3)
    workflow = _acdc_workflow(
        tmp_path / "run", data, vessa_ckpt=str(foundation_ckpt), max_iterations=3, val_interval=3, save_interval=3,
        feedback_start=2, vessa_weight_start=1.0, vessa_weight_end=0.0, vessa_decay_iterations=2,
        pool_quality_interval=2,
    )
    assert not workflow.check_properties()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append({k: float(e.state.output[0][k]) for k in ("loss_v", "vessa_weight")})
    )
    workflow.run()
    assert [s["vessa_weight"] for s in seen] == [1.0, 0.5, 0.0]
    assert all(math.isfinite(s["loss_v"]) for s in seen)
    assert (tmp_path / "run" / "models" / "model.pt").is_file()
    # VESSA's pseudo-labels scored on the unlabelled pool's hidden labels at iteration 2 and at the end
    quality = json.loads((tmp_path / "run" / "vessa_pool_quality.json").read_text())
    assert [(r["iteration"], r["feedback"]) for r in quality] == [(2, True), (3, True)]
    assert all(0.0 <= r["vessa"]["kept_share"] <= 1.0 and set(r["vessa"]["dice"]) == set(ACDC_CLASS_NAMES[1:]) for r in quality)
    assert math.isfinite(trainer.state.metrics["vessa_pool_dice"]) or quality[-1]["vessa"]["mean_dice"] is None
    workflow.finalize()


def _error_chain(error: BaseException) -> str:
    """MONAI wraps a component's error in its own; the message a user reads is along the chain."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(messages)


def test_bundle_vessa_bad_input(tmp_path, acdc_root, foundation_ckpt):
    from .helpers import copy_acdc_subset

    data = copy_acdc_subset(acdc_root, tmp_path / "acdc", ("patient099", "patient038"), slice_step=4)
    labeled = make_slice_datalist(data, labeled_cases=1)["labeled"][:2]
    renamed = TemplateBank.from_datalist(labeled, "acdc", "MRI", ["background", "rv", "myo", "lv"], image_size=SIZE)
    bank_dir = renamed.save(tmp_path / "bank")
    cases = [
        ({}, "method=vessa needs vessa_ckpt"),
        ({"vessa_ckpt": str(tmp_path / "nope.pt")}, "VESSA checkpoint not found"),
        ({"vessa_ckpt": str(foundation_ckpt), "vessa_train_vlm": "frozen"}, "does not fit the configured model"),
        ({"vessa_ckpt": str(foundation_ckpt), "template_bank": str(bank_dir)}, "has classes"),
    ]
    for i, (overrides, message) in enumerate(cases):
        with pytest.raises(Exception) as info:
            _acdc_workflow(tmp_path / f"run{i}", data, **overrides).parser.get_parsed_content("train#trainer")
        assert message in _error_chain(info.value)
