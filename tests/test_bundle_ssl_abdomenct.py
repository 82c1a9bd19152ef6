"""The vessa_ssl_abdomenct bundle: train, evaluate and infer on the synthetic CT demo set (the no-download default)
and on the one real CT of ../shared/data/abdomen_ct_example (TotalSegmentator labels remapped), method=vessa with
the weights and template bank of a vessa_foundation run on the same CT, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from vessa_components.data import (
    ABDOMENCT_CLASS_NAMES,
    ACDC_CLASS_NAMES,
    SYNTHETIC_MARKER,
    TOTALSEGMENTATOR_TO_ABDOMENCT1K,
    DataError,
    make_demo_abdomenct,
    make_slice_datalist,
)
from vessa_components.metrics import compute_volume_metrics
from vessa_components.networks import build_student
from vessa_components.templates import TemplateBank

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_ssl_abdomenct"
CONFIGS = BUNDLE / "configs"
FAST = {"roi_size": 64, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False}
TINY_RUN = {"max_iterations": 2, "val_interval": 2, "save_interval": 2}
CT_NAME, SEG_NAME = "example_ct_sm.nii.gz", "example_seg.nii.gz"
#: the real example's files, and its TotalSegmentator ids written as AbdomenCT-1K class names
REAL_EXAMPLE = {"data_layout": "abdomenct", "image_suffix": "_ct_sm.nii.gz", "label_suffix": "_seg.nii.gz"}
BY_CLASS_NAME = {"5": "liver", "2": "kidney", "3": "kidney", "1": "spleen", "7": "pancreas"}
#: two training cases of the demo set (Case_00007 and Case_00010 are its validation cases): Stage 1 takes each
#: template from another patient, so it needs two labelled cases, and Stage 2 must label the same ones
VESSA_LABELED = "Case_00002,Case_00003"
#: the settings of the tiny VESSA: no VLM, 64-pixel slices
VESSA_TINY = {"vessa_train_vlm": "off", "vessa_image_size": 64}


def _workflow(configs, workflow_type, output_dir, dataset_dir, **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / c) for c in configs]
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        dataset_dir=str(dataset_dir),
        **{**FAST, **overrides},
    )
    workflow.initialize()
    return workflow


def _infer(model_root: Path, inputs: Path, out: Path, **overrides) -> None:
    infer = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(model_root),
        dataset_dir=str(inputs), output_dir=str(out), roi_size=64, **overrides,
    )  # fmt: skip
    infer.initialize()
    infer.run()
    infer.finalize()


def _raised(workflow: ConfigWorkflow) -> list[BaseException]:
    """The chain of exceptions (the config parser wraps the real one) that running ``workflow`` raises."""
    with pytest.raises(Exception) as info:
        workflow.run()
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__
    return chain


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The bundle's synthetic default set (the size the bundle generates), made once for the module."""
    root = tmp_path_factory.mktemp("ct_demo") / "demo_data"
    make_demo_abdomenct(root, seed=0)
    return root


def test_properties(tmp_path, demo_dir):
    train = _workflow(["train.json"], "train", tmp_path, demo_dir)
    assert not train.check_properties()
    assert train.parser["data_layout"] == "abdomenct_demo" and train.parser["labeled_fraction"] == 0.05
    infer = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(BUNDLE))
    infer.initialize()
    assert not infer.check_properties()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_dir) -> tuple[Path, Path, dict]:
    """Two iterations of the default (UniMatch V2 on the synthetic set): (output_dir, slice root, datalist)."""
    out = tmp_path_factory.mktemp("ct_demo_run")
    train = _workflow(["train.json"], "train", out, demo_dir, **TINY_RUN)
    train.run()
    slices, datalist = Path(train.parser.get_parsed_content("slice_dir")), train.parser.get_parsed_content("datalist")
    train.finalize()
    return out, slices, datalist


def _flipped_copy(source: Path, target: Path) -> None:
    """``source`` stored left-right and front-back flipped with the matching affine (LPS instead of RAS): the same
    image in the world, another array."""
    image = nib.load(source)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(image.shape[:2]) - 1
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1, ::-1].copy(), image.affine @ flip), target)


def test_demo_train_evaluate_infer(tmp_path, demo_run, demo_dir):
    out, slices, datalist = demo_run
    # 10 cases: 2 validation, 8 training of which 5 % (rounded up) labelled
    assert len(datalist["labeled_patients"]) == 1 and len(datalist["validation"]) == 2
    assert {e["patient"] for e in datalist["unlabeled"]}.isdisjoint(datalist["labeled_patients"])
    assert len({e["patient"] for e in datalist["unlabeled"]}) == 7
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    build_student("unet", out_channels=5).load_state_dict(state)  # a flat state_dict of network_def
    assert (out / "checkpoints" / "checkpoint_iteration=2.pt").is_file()
    validation = json.loads((out / "validation" / "metrics.json").read_text())
    assert validation["num_volumes"] == 2 and "pancreas" in next(iter(validation["per_volume"].values()))

    evaluate = _workflow(["train.json", "evaluate.json"], "eval", out, demo_dir)
    evaluate.run()
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(report["per_volume"]) == set((slices / "val.list").read_text().split())

    case = datalist["validation"][0]["name"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / f"{case}_0000.nii.gz").symlink_to(demo_dir / f"{case}_0000.nii.gz")
    _infer(out, inputs, tmp_path / "pred")
    pred, source = nib.load(tmp_path / "pred" / f"{case}_0000_seg.nii.gz"), nib.load(demo_dir / f"{case}_0000.nii.gz")
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(5))


def test_inference_inverts_the_training_view(tmp_path, demo_run, demo_dir):
    """inference.json on an original NIfTI (HU, RAS or LPS) and evaluate.json on its converted volume run the same
    network on the same pixels. A two-iteration model predicts background only, so this uses a seeded random UNet
    with BatchNorm statistics taken from the data and no output bias, whose label maps vary across the image and
    would expose any orientation, transpose or windowing mismatch."""
    out, _, datalist = demo_run
    torch.manual_seed(0)
    network = build_student("unet", out_channels=5)
    with h5py.File(datalist["validation"][1]["image"]) as f:
        calibration = torch.nn.functional.interpolate(torch.as_tensor(f["image"][()])[:, None], (64, 64))
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = the plain average over the calibration pass
    with torch.no_grad():
        network.train()(calibration)
        network.decoder.out_conv.bias.zero_()
    model_root = tmp_path / "random_model"
    (model_root / "models").mkdir(parents=True)
    torch.save(network.state_dict(), model_root / "models" / "model.pt")
    evaluate = _workflow(
        ["train.json", "evaluate.json"], "eval", out, demo_dir,
        ckpt_path=str(model_root / "models" / "model.pt"), eval_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    evaluate.run()
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    case = datalist["validation"][0]["name"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "ras.nii.gz").symlink_to(demo_dir / f"{case}_0000.nii.gz")
    _flipped_copy(demo_dir / f"{case}_0000.nii.gz", inputs / "lps.nii.gz")
    _infer(model_root, inputs, tmp_path / "pred")
    ras, lps = (nib.load(tmp_path / "pred" / f"{name}_seg.nii.gz") for name in ("ras", "lps"))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    ras_labels, lps_labels = np.asarray(ras.dataobj), np.asarray(lps.dataobj)
    assert len(np.unique(ras_labels)) >= 3  # not a near-constant map
    np.testing.assert_array_equal(lps_labels[::-1, ::-1], ras_labels)
    truth = np.asarray(nib.load(demo_dir / f"{case}.nii.gz").dataobj)
    dice = compute_volume_metrics(ras_labels, truth, list(ABDOMENCT_CLASS_NAMES))
    for organ in ABDOMENCT_CLASS_NAMES[1:]:
        assert dice[organ]["dice"] == pytest.approx(report["per_volume"][case][organ]["dice"], abs=1e-6)
    assert any(dice[organ]["dice"] > 0 for organ in ABDOMENCT_CLASS_NAMES[1:])


def test_real_ct_one_case_train_and_infer(tmp_path, abdomen_ct_dir):
    out = tmp_path / "run"
    train = _workflow(["train.json"], "train", out, abdomen_ct_dir, label_map=BY_CLASS_NAME, **REAL_EXAMPLE, **TINY_RUN)
    with pytest.warns(UserWarning, match=r"only 1 case.*cut into 5 contiguous axial parts"):
        train.run()
    slices = Path(train.parser.get_parsed_content("slice_dir"))
    settings = json.loads((slices / "prepared.json").read_text())
    assert settings["axial_parts"] == 5
    assert settings["label_map"] == {str(k): v for k, v in sorted(TOTALSEGMENTATOR_TO_ABDOMENCT1K.items())}
    # 30 axial slices in 5 parts of 6: one validation part (a 6-slice volume), one labelled, three unlabelled
    datalist = train.parser.get_parsed_content("datalist")
    (val_part,) = [e["patient"] for e in datalist["validation"]]
    labeled, unlabeled = set(datalist["labeled_patients"]), {e["patient"] for e in datalist["unlabeled"]}
    assert len(labeled) == 1 and len(unlabeled) == 3 and val_part not in labeled | unlabeled
    assert len(datalist["labeled"]) == 6 and len(datalist["unlabeled"]) == 18
    with h5py.File(slices / "data" / f"{val_part}.h5") as f:
        assert f["image"].shape == (6, 101, 122) and f.attrs["spacing"].tolist() == [3.0, 3.0, 3.0]
        assert set(np.unique(f["label"][()]).tolist()) <= set(range(5))
    assert (out / "models" / "model.pt").is_file()
    train.finalize()

    # inference on the real CT as stored (RAS) and stored flipped (LPS): label maps on each input's grid
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "ras.nii.gz").symlink_to(abdomen_ct_dir / CT_NAME)
    _flipped_copy(abdomen_ct_dir / CT_NAME, inputs / "lps.nii.gz")
    _infer(out, inputs, tmp_path / "pred")
    for name in ("ras", "lps"):
        pred, source = nib.load(tmp_path / "pred" / f"{name}_seg.nii.gz"), nib.load(inputs / f"{name}.nii.gz")
        assert pred.shape == source.shape == (122, 101, 30) and np.allclose(pred.affine, source.affine)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(5))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"label_map": {"5": "livr"}}, ValueError, "unknown class name 'livr'"),
        ({"label_map": None}, DataError, "example_seg.nii.gz: label values [5, 6,"),
        ({"label_map": {"5": 7}}, DataError, "label values [7] outside the declared classes 0..4 after remapping"),
        ({"label_map": "totalseg"}, ValueError, "unknown label_map preset 'totalseg'"),
        ({"label_map": "totalsegmentator", "image_suffix": "_0000.nii.gz"}, DataError, "no '<case>_0000.nii.gz' images"),
    ],
    ids=["unknown-class-name", "ids-out-of-range", "mapped-out-of-range", "unknown-preset", "no-images"],
)
def test_bad_ct_input(tmp_path, abdomen_ct_dir, overrides, error, message):
    workflow = _workflow(["train.json"], "train", tmp_path, abdomen_ct_dir, **{**REAL_EXAMPLE, **TINY_RUN, **overrides})
    chain = _raised(workflow)
    assert any(isinstance(e, error) and message in str(e) for e in chain), chain
    assert not (tmp_path / "prepared_data" / "abdomenct_ssl4mis").exists()  # nothing half-converted


def test_bad_settings_and_empty_inputs(tmp_path, demo_dir):
    chain = _raised(_workflow(["train.json"], "train", tmp_path, demo_dir, label_map="totalsegmentator", **TINY_RUN))
    assert any("label_map is for data_layout 'abdomenct'" in str(e) for e in chain), chain
    chain = _raised(_workflow(["train.json"], "train", tmp_path, demo_dir, labeled_cases="Case_00099", **TINY_RUN))
    assert any(isinstance(e, DataError) and "Case_00099" in str(e) for e in chain), chain
    empty = tmp_path / "empty"
    empty.mkdir()
    chain = _raised(_workflow(["train.json"], "train", tmp_path, empty, data_layout="abdomenct", **TINY_RUN))
    assert any(isinstance(e, DataError) and f"{empty}: no '<case>_0000.nii.gz' images" in str(e) for e in chain)
    infer = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(tmp_path),
        dataset_dir=str(empty), output_dir=str(tmp_path / "pred"),
    )  # fmt: skip
    infer.initialize()
    chain = _raised(infer)
    assert any(isinstance(e, DataError) and "no input file matches '*.nii*'" in str(e) for e in chain), chain
    assert (demo_dir / SYNTHETIC_MARKER).is_file()


@pytest.fixture(scope="module")
def ct_foundation(tmp_path_factory, demo_dir) -> Path:
    """A one-iteration vessa_foundation run on the demo CT (its models/model.pt and template_bank/), labelled cases
    VESSA_LABELED, as the README's recipe for method=vessa runs it."""
    out = tmp_path_factory.mktemp("ct_foundation")
    foundation = REPO_ROOT / "bundles" / "vessa_foundation"
    workflow = ConfigWorkflow(
        config_file=str(foundation / "configs" / "train.json"), workflow_type="train", bundle_root=str(foundation),
        output_dir=str(out), dataset_dir=str(demo_dir), data_layout="abdomenct_demo", labeled_cases=VESSA_LABELED,
        dataset_name="abdomenct", modality="CT", class_names=list(ABDOMENCT_CLASS_NAMES), train_vlm="off",
        image_size=VESSA_TINY["vessa_image_size"], max_iterations=1, val_interval=1, save_interval=1,
        batch_size=2, num_workers=0, cache_rate=0.0, show_progress=False,
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (out / "models" / "model.pt").is_file() and (out / "template_bank").is_dir()
    return out


def test_demo_train_with_vessa(tmp_path, demo_dir, ct_foundation):
    from ignite.engine import Events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train = _workflow(
        ["train.json"], "train", out, demo_dir, method="vessa", labeled_cases=VESSA_LABELED,
        vessa_ckpt=str(ct_foundation / "models" / "model.pt"), template_bank=str(ct_foundation / "template_bank"),
        max_iterations=3, val_interval=3, save_interval=3, feedback_start=2, vessa_decay_iterations=2,
        vessa_conf_thresh=0.0, **VESSA_TINY,
    )  # fmt: skip
    assert not train.check_properties()
    trainer = train.parser.get_parsed_content("train#trainer")
    keys = ("loss_v", "mask_ratio_v", "vessa_weight", "vessa_cache_size")
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append({k: float(e.state.output[0][k]) for k in keys})
    )
    train.run()
    # a threshold of 0 keeps every VESSA pixel: loss_v is a real, finite term, weighted 1 -> 0 over two iterations
    assert [s["vessa_weight"] for s in seen] == [1.0, 0.5, 0.0]
    assert all(math.isfinite(s["loss_v"]) and s["loss_v"] > 0 and s["mask_ratio_v"] == 1.0 for s in seen)
    labeler = train.parser.get_parsed_content("train#vessa_labeler")
    batch = FAST["batch_size"]
    # the first epoch over the 144 unlabelled slices draws no slice twice: each is computed once and cached
    assert len(labeler) == seen[-1]["vessa_cache_size"] == labeler.misses == 3 * batch and labeler.hits == 0
    scalars = set()
    for events in (out / "logs").iterdir():
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss_v", "mask_ratio_v", "vessa_weight", "vessa_cache_size", "vessa_hit_rate"} <= scalars
    assert (out / "models" / "model.pt").is_file()
    train.finalize()


def test_vessa_bad_template_bank(tmp_path, demo_dir, ct_foundation, acdc_root):
    """A bank that does not fit the run stops it before training, with a message naming the mismatch."""
    acdc_labeled = make_slice_datalist(acdc_root, labeled_cases=1)["labeled"][:2]
    acdc_bank = TemplateBank.from_datalist(acdc_labeled, "acdc", "MRI", ACDC_CLASS_NAMES, image_size=64)
    ct_slices = ct_foundation / "prepared_data" / "abdomenct_demo_ssl4mis"
    ct_labeled = make_slice_datalist(ct_slices, labeled_cases=VESSA_LABELED)["labeled"][::8]
    renamed = ["background", "liver", "kidneys", "spleen", "pancreas"]
    renamed_bank = TemplateBank.from_datalist(ct_labeled, "abdomenct", "CT", renamed, image_size=64)
    cases = [
        # a bank of an ACDC foundation run
        (acdc_bank.save(tmp_path / "acdc_bank"), {"labeled_cases": VESSA_LABELED}, "has no data set 'abdomenct'"),
        (renamed_bank.save(tmp_path / "renamed_bank"), {"labeled_cases": VESSA_LABELED}, "has classes"),
        # the foundation's own bank, but this run labels the default 5 % (one case) instead of the same two cases
        (ct_foundation / "template_bank", {}, "that are not labelled in this run"),
    ]
    out = tmp_path / "run"  # one output folder for all cases, so the data are converted once
    for bank, overrides, message in cases:
        workflow = _workflow(
            ["train.json"], "train", out, demo_dir, method="vessa", template_bank=str(bank),
            vessa_ckpt=str(ct_foundation / "models" / "model.pt"), **VESSA_TINY, **TINY_RUN, **overrides,
        )  # fmt: skip
        chain = _raised(workflow)
        assert any(isinstance(e, ValueError) and message in str(e) for e in chain), chain
    assert not (out / "models").exists() and not (out / "checkpoints").exists()
