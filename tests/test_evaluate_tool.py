"""tools/evaluate.py and evaluate_folders: NIfTI folders in, a checked report out, nothing written on bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vessa_components.data.acdc import ACDC_CLASS_NAMES
from vessa_components.data.errors import DataError
from vessa_components.metrics import compute_volume_metrics, evaluate_folders

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.5, 1.5, 8.0)


def load_tool():
    """tools/evaluate.py as a module (tools/ is not a package), to call ``main`` in-process."""
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO_ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_nifti(path: Path, label_map: np.ndarray, spacing=SPACING) -> Path:
    nib.save(nib.Nifti1Image(label_map.astype(np.uint8), np.diag([*spacing, 1.0])), path)
    return path


def box_label() -> tuple[np.ndarray, np.ndarray]:
    """A 6x10x10 box of class 3 and its one-voxel erosion (4x8x8).

    Worked out by hand: every eroded surface voxel is 1 voxel from the box surface; of the box's 344 surface voxels
    256 are 1 away, 80 (edges) sqrt(2) and 8 (corners) sqrt(3), so the 95th percentile of all 528 is sqrt(2).
    """
    label = np.zeros((10, 20, 20), np.uint8)
    label[2:8, 4:14, 4:14] = 3
    return label, np.where(ndimage.binary_erosion(label == 3), 3, 0).astype(np.uint8)


@pytest.fixture
def folders(tmp_path, acdc_root):
    """pred/ and labels/ with a perfect prediction, an eroded box, and a real ACDC volume with an eroded LV."""
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    pred_dir.mkdir()
    label_dir.mkdir()
    label, eroded = box_label()
    save_nifti(label_dir / "box.nii.gz", label)
    save_nifti(pred_dir / "box.nii.gz", eroded)
    perfect = np.zeros((8, 16, 16), np.uint8)
    perfect[2:6, 3:9, 3:9], perfect[2:6, 9:12, 3:9] = 1, 2
    save_nifti(label_dir / "perfect.nii", perfect)
    save_nifti(pred_dir / "perfect.nii", perfect)
    with h5py.File(acdc_root / "data" / "patient028_frame01.h5", "r") as volume:
        acdc_label = volume["label"][:]
    acdc_pred = np.where((acdc_label == 3) & ~ndimage.binary_erosion(acdc_label == 3), 0, acdc_label)
    save_nifti(label_dir / "patient028_frame01.nii.gz", acdc_label, spacing=(10.0, 1.56, 1.56))
    save_nifti(pred_dir / "patient028_frame01.nii.gz", acdc_pred, spacing=(10.0, 1.56, 1.56))
    return pred_dir, label_dir


def check_results(per_volume: dict, acdc_root: Path) -> None:
    assert list(per_volume) == ["box", "patient028_frame01", "perfect"]
    for class_name in ("right_ventricle", "myocardium"):
        assert per_volume["perfect"][class_name]["dice"] == 1.0 and per_volume["perfect"][class_name]["hd95"] == 0.0
    assert per_volume["perfect"]["left_ventricle"]["prediction_empty"] is True
    assert per_volume["perfect"]["left_ventricle"]["reference_empty"] is True
    box = per_volume["box"]["left_ventricle"]
    assert box["dice"] == pytest.approx(2 * 256 / (600 + 256))
    assert box["hd95"] == pytest.approx(math.sqrt(2))
    assert box["asd"] == pytest.approx(1.0)
    label, eroded = box_label()
    assert box == pytest.approx(compute_volume_metrics(eroded, label, ACDC_CLASS_NAMES, SPACING)["left_ventricle"])
    assert box["asd_mm"] != pytest.approx(box["asd"])  # the header's spacing was used
    acdc = per_volume["patient028_frame01"]
    assert acdc["right_ventricle"]["dice"] == 1.0 and acdc["myocardium"]["dice"] == 1.0
    assert acdc["left_ventricle"]["dice"] < 1.0 and acdc["left_ventricle"]["hd95"] >= 1.0
    with h5py.File(acdc_root / "data" / "patient028_frame01.h5", "r") as volume:
        label = volume["label"][:]
    pred = np.where((label == 3) & ~ndimage.binary_erosion(label == 3), 0, label)
    direct = compute_volume_metrics(pred, label, ACDC_CLASS_NAMES, spacing=(10.0, 1.56, 1.56))
    assert acdc["left_ventricle"] == pytest.approx(direct["left_ventricle"], rel=1e-5)


def test_evaluate_folders(folders, acdc_root, tmp_path):
    per_volume = evaluate_folders(*folders)
    check_results(per_volume, acdc_root)
    assert not (tmp_path / "report.json").exists()  # evaluation alone writes nothing


@pytest.mark.slow
def test_tool_end_to_end(folders, acdc_root, tmp_path):
    pred_dir, label_dir = folders
    out, md = tmp_path / "out" / "report.json", tmp_path / "out" / "report.md"
    command = [sys.executable, "tools/evaluate.py", "--pred_dir", str(pred_dir), "--label_dir", str(label_dir)]
    command += ["--out", str(out), "--md", str(md), "--class_names", ",".join(ACDC_CLASS_NAMES)]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    check_results(report["per_volume"], acdc_root)
    assert report["classes"] == list(ACDC_CLASS_NAMES[1:]) and report["num_volumes"] == 3
    assert {"volume": "perfect", "class": "left_ventricle", "prediction_empty": True, "reference_empty": True} in (
        report["empty_cases"]
    )
    assert "| left_ventricle |" in completed.stdout and "| mean |" in completed.stdout
    assert md.read_text().strip() == completed.stdout.strip()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def replace_label(path: Path, value: int) -> None:
    label_map = np.asanyarray(nib.load(path).dataobj).copy()
    label_map[0, 0, 0] = value
    save_nifti(path, label_map)


@pytest.mark.parametrize(
    ("damage", "culprit"),
    [
        (lambda pred, labels: truncate(pred / "box.nii.gz"), "pred/box.nii.gz"),
        (lambda pred, labels: truncate(pred / "patient028_frame01.nii.gz"), "pred/patient028_frame01.nii.gz"),
        (lambda pred, labels: truncate(labels / "perfect.nii"), "labels/perfect.nii"),
        (lambda pred, labels: save_nifti(pred / "box.nii.gz", np.zeros((10, 20, 19))), "pred/box.nii.gz"),
        (lambda pred, labels: replace_label(labels / "box.nii.gz", 7), "labels/box.nii.gz"),
        (lambda pred, labels: replace_label(pred / "box.nii.gz", 7), "pred/box.nii.gz"),
        (lambda pred, labels: (labels / "box.nii.gz").unlink(), "pred/box.nii.gz"),
        (lambda pred, labels: (pred / "perfect.nii").unlink(), "labels/perfect.nii"),
        (lambda pred, labels: save_nifti(pred / "box.nii.gz", box_label()[1], (1.0, 1.0, 1.0)), "pred/box.nii.gz"),
    ],
    ids=[
        "truncated_header", "truncated_data", "truncated_label", "shape", "label_7", "pred_7", "no_label", "no_pred",
        "spacing",
    ],
)
def test_bad_input_raises_data_error_and_writes_nothing(folders, tmp_path, damage, culprit):
    pred_dir, label_dir = folders
    damage(pred_dir, label_dir)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError) as error:
        load_tool().main(str(pred_dir), str(label_dir), str(out_dir / "report.json"), md=str(out_dir / "report.md"))
    assert Path(error.value.path) == tmp_path / culprit
    assert str(tmp_path / culprit) in str(error.value)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_problems_are_reported_in_words(folders):
    pred_dir, label_dir = folders
    (label_dir / "box.nii.gz").unlink()
    with pytest.raises(DataError, match="no label file of the same name"):
        evaluate_folders(pred_dir, label_dir)
    replace_label(label_dir / "perfect.nii", 7)
    (pred_dir / "box.nii.gz").unlink()
    with pytest.raises(DataError, match=r"label values \[7\] are outside 0..3"):
        evaluate_folders(pred_dir, label_dir)
    (pred_dir / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI files"):
        evaluate_folders(pred_dir, pred_dir / "empty")
    with pytest.raises(DataError, match="not a folder"):
        evaluate_folders(pred_dir, pred_dir / "missing")
