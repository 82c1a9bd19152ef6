"""Per-volume metrics: medpy's definitions on MONAI's surface utilities, the empty rule, reports and the accumulator."""

from __future__ import annotations

import json
import math
import time

import h5py
import numpy as np
import pytest
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage

from vessa_components.data.acdc import ACDC_CLASS_NAMES
from vessa_components.metrics import (
    EMPTY_RULE,
    SUMMARY_RULE,
    VolumeMetricAccumulator,
    asd,
    asd_symmetric,
    build_report,
    compute_volume_metrics,
    format_markdown,
    hd95,
    hd95_max_directed,
    summarize,
    surface_distances,
    write_report,
)

CLASS_NAMES = ("background", "a", "b")


def medpy_surface_distances(result: np.ndarray, reference: np.ndarray, spacing=None) -> np.ndarray:
    """Independent re-statement of medpy's ``__surface_distances`` (surface = object XOR its erosion)."""
    footprint = ndimage.generate_binary_structure(result.ndim, 1)
    result_border = result ^ ndimage.binary_erosion(result, structure=footprint, iterations=1, border_value=0)
    reference_border = reference ^ ndimage.binary_erosion(reference, structure=footprint, iterations=1, border_value=0)
    return ndimage.distance_transform_edt(~reference_border, sampling=spacing)[result_border]


def medpy_hd95(result, reference, spacing=None) -> float:
    both = (medpy_surface_distances(result, reference, spacing), medpy_surface_distances(reference, result, spacing))
    return float(np.percentile(np.hstack(both), 95))


def medpy_asd(result, reference, spacing=None) -> float:
    return float(medpy_surface_distances(result, reference, spacing).mean())


def random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth random blobs, several of which touch the image border."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0) > 0.15


# MONAI's own compute_hausdorff_distance passes a deprecated argument to get_mask_edges
@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("spacing", [None, (4.0, 1.5, 1.25)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_metrics_equal_medpy_and_monai_on_random_blobs(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, ref = random_blob(rng, (9, 30, 26)), random_blob(rng, (9, 30, 26))
    assert pred[0].any() and ref[:, -1].any(), "the blobs must touch the image border for this test to mean anything"
    distances = surface_distances(pred, ref, spacing)
    assert hd95(distances) == pytest.approx(medpy_hd95(pred, ref, spacing), rel=1e-6)
    assert asd(distances) == pytest.approx(medpy_asd(pred, ref, spacing), rel=1e-6)
    # the MONAI-convention variants equal MONAI's own metrics
    pred_t, ref_t = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    monai_hd95 = compute_hausdorff_distance(pred_t, ref_t, include_background=True, percentile=95, spacing=spacing)
    monai_assd = compute_average_surface_distance(
        pred_t, ref_t, include_background=True, symmetric=True, spacing=spacing
    )
    assert hd95_max_directed(distances) == pytest.approx(float(monai_hd95), rel=1e-5)
    assert asd_symmetric(distances) == pytest.approx(float(monai_assd), rel=1e-5)


def test_random_blobs_2d():
    rng = np.random.default_rng(5)
    pred, ref = random_blob(rng, (40, 33)), random_blob(rng, (40, 33))
    distances = surface_distances(pred, ref, (0.7, 1.9))
    assert hd95(distances) == pytest.approx(medpy_hd95(pred, ref, (0.7, 1.9)), rel=1e-6)
    assert asd(distances) == pytest.approx(medpy_asd(pred, ref, (0.7, 1.9)), rel=1e-6)


def test_offset_cubes_exact_values():
    """Two 4x4x4 cubes, the prediction shifted by one voxel along the last axis (counts worked out by hand:
    each directed set has 20 ones and 36 zeros in voxels; in mm with spacing (2, 1, 3), 16 threes, 4 ones, 36 zeros)."""
    label = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 2:6] = 1
    pred[2:6, 2:6, 3:7] = 1
    metrics = compute_volume_metrics(pred, label, ("background", "cube"), spacing=(2.0, 1.0, 3.0))["cube"]
    assert metrics["dice"] == pytest.approx(2 * 48 / (64 + 64))
    assert metrics["jaccard"] == pytest.approx(48 / 80)
    assert metrics["hd95"] == pytest.approx(1.0)
    assert metrics["asd"] == pytest.approx(20 / 56)
    assert metrics["hd95_max_directed"] == pytest.approx(1.0)
    assert metrics["asd_symmetric"] == pytest.approx(40 / 112)
    assert metrics["hd95_mm"] == pytest.approx(3.0)
    assert metrics["asd_mm"] == pytest.approx((16 * 3 + 4 * 1) / 56)
    assert metrics["prediction_empty"] is False and metrics["reference_empty"] is False


def test_offset_squares_2d():
    """4x4 squares shifted by one column: 12 surface pixels each, 6 of them at distance 1 from the other surface."""
    label = np.zeros((8, 9), np.uint8)
    pred = np.zeros_like(label)
    label[2:6, 2:6] = 2
    pred[2:6, 3:7] = 2
    metrics = compute_volume_metrics(pred, label, CLASS_NAMES)
    assert metrics["b"]["dice"] == pytest.approx(0.75)
    assert metrics["b"]["jaccard"] == pytest.approx(0.6)
    assert metrics["b"]["hd95"] == pytest.approx(1.0)
    assert metrics["b"]["asd"] == pytest.approx(0.5)
    assert metrics["a"]["prediction_empty"] and metrics["a"]["reference_empty"]


def test_medpy_and_monai_conventions_differ_as_documented():
    """Prediction: one voxel; reference: that voxel and one 10 voxels away. pred->ref = [0], ref->pred = [0, 10]."""
    label = np.zeros((3, 20), np.uint8)
    label[1, 3] = label[1, 13] = 1
    pred = np.zeros_like(label)
    pred[1, 3] = 1
    metrics = compute_volume_metrics(pred, label, ("background", "x"))["x"]
    assert metrics["dice"] == pytest.approx(2 / 3)
    assert metrics["jaccard"] == pytest.approx(1 / 2)
    assert metrics["hd95"] == pytest.approx(9.0)  # percentile 95 of [0, 0, 10]
    assert metrics["hd95_max_directed"] == pytest.approx(9.5)  # max(percentile 95 of [0], of [0, 10])
    assert metrics["asd"] == pytest.approx(0.0)
    assert metrics["asd_symmetric"] == pytest.approx(10 / 3)


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 5.0), (2, 1.5)])
def test_single_voxel_shift_with_anisotropic_spacing(axis, expected_mm):
    label = np.zeros((4, 5, 5), np.uint8)
    pred = np.zeros_like(label)
    label[1, 2, 2] = 1
    shifted = [1, 2, 2]
    shifted[axis] += 1
    pred[tuple(shifted)] = 1
    metrics = compute_volume_metrics(pred, label, ("background", "x"), spacing=(5.0, 1.5, 1.5))["x"]
    assert metrics["dice"] == 0.0 and metrics["jaccard"] == 0.0
    for name in ("hd95", "asd", "hd95_max_directed", "asd_symmetric"):
        assert metrics[name] == pytest.approx(1.0)
        assert metrics[f"{name}_mm"] == pytest.approx(expected_mm)


def test_object_touching_the_image_border_has_a_surface_there():
    """Prediction fills the 5x5 image, reference its first 4 columns: border pixels are surface (medpy's rule), so
    pred->ref = 11 zeros + 5 ones and ref->pred = 11 zeros + 3 ones."""
    pred = np.ones((5, 5), np.uint8)
    label = pred.copy()
    label[:, 4] = 0
    metrics = compute_volume_metrics(pred, label, ("background", "x"))["x"]
    assert metrics["asd"] == pytest.approx(5 / 16)
    assert metrics["asd_symmetric"] == pytest.approx(8 / 30)
    assert metrics["hd95"] == pytest.approx(1.0)


def test_empty_rule():
    shape, spacing = (10, 20, 30), (2.0, 1.0, 0.5)
    diagonal, diagonal_mm = math.sqrt(10**2 + 20**2 + 30**2), math.sqrt(20**2 + 20**2 + 15**2)
    label = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    label[2:5, 2:5, 2:5] = 1  # class a: only in the reference
    pred[6:8, 6:8, 6:8] = 2  # class b: only in the prediction
    metrics = compute_volume_metrics(torch.from_numpy(pred), torch.from_numpy(label), CLASS_NAMES, spacing=spacing)
    for class_name, pred_empty in (("a", True), ("b", False)):
        values = metrics[class_name]
        assert values["dice"] == 0.0 and values["jaccard"] == 0.0
        for name in ("hd95", "asd", "hd95_max_directed", "asd_symmetric"):
            assert values[name] == pytest.approx(diagonal)
            assert values[f"{name}_mm"] == pytest.approx(diagonal_mm)
        assert values["prediction_empty"] is pred_empty and values["reference_empty"] is not pred_empty
    both_empty = compute_volume_metrics(pred * 0, label * 0, CLASS_NAMES)["a"]
    assert both_empty["dice"] == 1.0 and both_empty["jaccard"] == 1.0
    assert both_empty["hd95"] == 0.0 and both_empty["asd"] == 0.0
    assert both_empty["prediction_empty"] and both_empty["reference_empty"]
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(pred == 1, label == 1)


def test_invalid_inputs_name_the_volume():
    label = np.zeros((4, 6, 6), np.uint8)
    with pytest.raises(ValueError, match="case_7: prediction shape"):
        compute_volume_metrics(np.zeros((4, 6, 5), np.uint8), label, CLASS_NAMES, name="case_7")
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"case_7: label: label values \[7\] are outside 0..2"):
        compute_volume_metrics(label, bad, CLASS_NAMES, name="case_7")
    with pytest.raises(ValueError, match=r"case_7: prediction: label values \[-1\]"):
        compute_volume_metrics(label.astype(np.int16) - 1, label, CLASS_NAMES, name="case_7")
    with pytest.raises(ValueError, match="not integers"):
        compute_volume_metrics(label + 0.5, label, CLASS_NAMES, name="case_7")
    with pytest.raises(ValueError, match="spacing"):
        compute_volume_metrics(label, label, CLASS_NAMES, spacing=(1.0, 1.0), name="case_7")


def test_real_acdc_volume_is_fast_and_matches_medpy(acdc_root):
    with h5py.File(acdc_root / "data" / "patient028_frame01.h5", "r") as volume:
        label = volume["label"][:]
    assert label.ndim == 3 and set(np.unique(label)) == {0, 1, 2, 3}
    # a plausible prediction: LV eroded, RV shifted by two pixels, myocardium perfect
    pred = np.where((label == 3) & ~ndimage.binary_erosion(label == 3), 2, label)
    pred[pred == 1] = 0
    pred[np.roll(label == 1, 2, axis=2) & (pred == 0)] = 1
    spacing = (10.0, 1.5, 1.5)
    compute_volume_metrics(pred, label, ACDC_CLASS_NAMES, spacing=spacing)  # warm-up (imports, caches)
    elapsed = []
    for _ in range(3):
        start = time.perf_counter()
        metrics = compute_volume_metrics(pred, label, ACDC_CLASS_NAMES, spacing=spacing)
        elapsed.append(time.perf_counter() - start)
    assert min(elapsed) < 0.5
    for value, class_name in enumerate(ACDC_CLASS_NAMES[1:], start=1):
        assert metrics[class_name]["hd95"] == pytest.approx(medpy_hd95(pred == value, label == value), rel=1e-6)
        expected_asd_mm = medpy_asd(pred == value, label == value, spacing)
        assert metrics[class_name]["asd_mm"] == pytest.approx(expected_asd_mm, rel=1e-6)
    for class_name in ACDC_CLASS_NAMES[1:]:
        assert 0.0 < metrics[class_name]["dice"] < 1.0 and metrics[class_name]["hd95"] > 0.0


def _volume(dice_a: float, dice_b: float, hd_a: float = 1.0, hd_b: float = 3.0) -> dict:
    keys = {"jaccard": 0.0, "asd": 0.0, "prediction_empty": False, "reference_empty": False}
    return {"a": {"dice": dice_a, "hd95": hd_a, **keys}, "b": {"dice": dice_b, "hd95": hd_b, **keys}}


def test_summary_per_class_and_mean_over_classes():
    per_volume = {"v1": _volume(1.0, 0.5), "v2": _volume(0.5, 0.0, hd_a=3.0)}
    summary = summarize(per_volume)
    assert summary["a"]["dice"] == {"mean": 0.75, "std": 0.25}
    assert summary["b"]["dice"] == {"mean": 0.25, "std": 0.25}
    # per-volume means over classes are 0.75 and 0.25
    assert summary["mean"]["dice"] == {"mean": 0.5, "std": 0.25}
    assert summary["mean"]["hd95"] == {"mean": 2.5, "std": 0.5}
    with pytest.raises(ValueError, match="v3/a: metrics"):
        summarize({**per_volume, "v3": {"a": {"dice": 1.0}, "b": {"dice": 1.0}}})
    with pytest.raises(ValueError, match="no volumes"):
        summarize({})


def test_report_and_markdown_table(tmp_path):
    label = np.zeros((6, 12, 12), np.uint8)
    label[1:5, 2:8, 2:8] = 1
    pred = label.copy()
    pred[1:5, 2:8, 2] = 0
    accumulator = VolumeMetricAccumulator(CLASS_NAMES, spacing_aware=True)
    accumulator.add("v1", pred, label, spacing=(3.0, 1.0, 1.0))
    accumulator.add("v2", label, label, spacing=(3.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="v2: this volume was already added"):
        accumulator.add("v2", label, label, spacing=(3.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="v3: spacing_aware"):
        accumulator.add("v3", label, label)
    dice_v1 = 2 * 120 / (120 + 144)
    assert accumulator.mean_dice() == pytest.approx((dice_v1 + 1.0 + 1.0 + 1.0) / 4)

    report = write_report(accumulator.results, tmp_path / "report.json", tmp_path / "report.md")
    assert json.loads((tmp_path / "report.json").read_text()) == report == accumulator.report()
    assert report["empty_rule"] == EMPTY_RULE and report["summary_rule"] == SUMMARY_RULE
    assert report["classes"] == ["a", "b"] and report["num_volumes"] == 2
    assert report["units"]["hd95"].startswith("voxels") and report["units"]["hd95_mm"].startswith("mm")
    assert {"volume": "v1", "class": "b", "prediction_empty": True, "reference_empty": True} in report["empty_cases"]
    assert report["summary"]["a"]["dice"]["mean"] == pytest.approx((dice_v1 + 1.0) / 2)
    markdown = (tmp_path / "report.md").read_text()
    assert markdown == format_markdown(report)
    assert "| Class | Dice (%) | Jaccard (%) | HD95 (voxels) | ASD (voxels) | HD95 (mm) | ASD (mm) |" in markdown
    assert f"| a | {50 * (dice_v1 + 1.0):.2f} ± {50 * (1.0 - dice_v1):.2f} |" in markdown
    assert "| mean |" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]

    accumulator.reset()
    assert len(accumulator) == 0
    voxel_only = VolumeMetricAccumulator(CLASS_NAMES)
    voxel_only.add("v1", pred, label, spacing=(3.0, 1.0, 1.0))
    assert "hd95_mm" not in voxel_only.results["v1"]["a"]
    assert "HD95 (mm)" not in format_markdown(build_report(voxel_only.results))
