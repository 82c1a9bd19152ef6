"""The raw ACDC layout reader, the patient split and the raw -> SSL4MIS converter, including every bad input."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from vessa_components.data.acdc import SSL4MIS_TEST_PATIENTS, SSL4MIS_VAL_PATIENTS
from vessa_components.data.acdc_raw import (
    convert_acdc_raw_to_ssl4mis,
    list_raw_cases,
    read_info_cfg,
    split_patients,
)
from vessa_components.data.demo import make_demo_acdc
from vessa_components.data.errors import DataError

#: tiny volumes: the reader and converter do not care about anatomy
SHAPE, SPACING = (32, 36, 3), (3.0, 2.5, 10.0)


@pytest.fixture
def raw_root(tmp_path) -> Path:
    """Three synthetic patients in the raw layout, ``ROOT/training/patientXXX``."""
    root = tmp_path / "raw"
    make_demo_acdc(root, n_patients=3, seed=0, shape=SHAPE, spacing=SPACING)
    return root


def test_read_info_cfg(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_text("ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
    assert read_info_cfg(path) == {"ed": 1, "es": 12, "group": "DCM", "height": 184.0, "weight": 95.0, "nb_frame": 30}
    path.write_text("ES: 9\nED: 1.0\n")  # any order; optional fields missing
    assert read_info_cfg(path) == {"ed": 1, "es": 9, "group": None, "height": None, "weight": None, "nb_frame": None}


@pytest.mark.parametrize(
    "text, problem",
    [(None, "cannot read"), ("ED: 1\nGroup: NOR\n", "ES"), ("ES: 4\n", "ED"), ("ED: one\nES: 4\n", "not a number")],
)
def test_read_info_cfg_rejects_bad_files(tmp_path, text, problem):
    path = tmp_path / "Info.cfg"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=problem) as error:
        read_info_cfg(path)
    assert str(path) in str(error.value)


def test_list_raw_cases_finds_patients_in_root_training_and_testing(raw_root):
    shutil.move(raw_root / "training" / "patient003", raw_root / "testing" / "patient003")
    shutil.move(raw_root / "training" / "patient001", raw_root / "patient001")
    cases = list_raw_cases(raw_root)
    assert [c.patient for c in cases] == ["patient001", "patient002", "patient003"]
    for case in cases:
        info = read_info_cfg(case.ed_image.parent / "Info.cfg")
        assert (case.ed_frame, case.es_frame, case.group) == (info["ed"], info["es"], "SYNTHETIC")
        assert case.ed_image.name == f"{case.patient}_frame01.nii.gz"
        assert case.es_label.name == f"{case.patient}_frame{info['es']:02d}_gt.nii.gz"
        assert case.spacing == SPACING
    assert cases[2].ed_image.parent == raw_root / "testing" / "patient003"


def test_list_raw_cases_rejects_missing_files(raw_root, tmp_path):
    with pytest.raises(DataError, match="no patientXXX") as error:
        list_raw_cases(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)
    gt = list_raw_cases(raw_root)[1].es_label
    gt.unlink()
    with pytest.raises(DataError, match="missing ES ground truth") as error:
        list_raw_cases(raw_root)
    assert str(gt) in str(error.value)


def test_split_patients():
    acdc = [f"patient{i:03d}" for i in range(1, 151)]  # training (1-100) and testing (101-150) sets
    split = split_patients(acdc)
    assert split["val"] == sorted(SSL4MIS_VAL_PATIENTS) and split["test"] == sorted(SSL4MIS_TEST_PATIENTS)
    assert len(split["train"]) == 70 and split["unused"] == acdc[100:]

    twelve = acdc[:12]
    split = split_patients(twelve, seed=1)
    assert split == split_patients(twelve, seed=1) and len(split["val"]) == 2 and split["test"] == []
    assert sorted(split["train"] + split["val"]) == twelve
    assert {tuple(split_patients(twelve, seed=s)["val"]) for s in range(5)} != {tuple(split["val"])}
    assert split_patients(acdc[:100], val_fraction=0.1)["val"] != sorted(SSL4MIS_VAL_PATIENTS)

    split = split_patients(twelve, val_patients=[2, "patient003"], test_patients=["11"])
    assert (split["val"], split["test"]) == (["patient002", "patient003"], ["patient011"])
    assert len(split["train"]) == 9
    with pytest.raises(ValueError, match="not in the data set"):
        split_patients(twelve, val_patients=[13])
    with pytest.raises(ValueError, match="both"):
        split_patients(twelve, val_patients=[2], test_patients=[2])


def test_convert_writes_the_ssl4mis_layout(raw_root, tmp_path):
    out = tmp_path / "ssl"
    summary = convert_acdc_raw_to_ssl4mis(raw_root, out, val_patients=[2], test_patients=["patient003"])
    assert (summary["train"], summary["val"], summary["test"]) == (["patient001"], ["patient002"], ["patient003"])
    assert (summary["train_slices"], summary["volumes"]) == (6, 4)
    assert (out / "train_slices.list").read_text().split() == [
        f"patient001_frame0{f}_slice_{k}" for f in (1, 2) for k in (1, 2, 3)
    ]
    assert (out / "val.list").read_text().split() == ["patient002_frame01", "patient002_frame02"]
    assert (out / "test.list").read_text().split() == ["patient003_frame01", "patient003_frame02"]
    es_volume = nib.load(list_raw_cases(raw_root)[2].es_image).get_fdata()
    with h5py.File(out / "data" / "patient003_frame02.h5") as f:
        assert (f["image"].dtype, f["label"].dtype, f["image"].shape) == (np.float32, np.uint8, SHAPE[::-1])
        expected = (es_volume - es_volume.min()) / (es_volume.max() - es_volume.min())
        np.testing.assert_allclose(f["image"][()], expected.transpose(2, 1, 0), atol=1e-6)
    for name in (out / "train_slices.list").read_text().split():
        with h5py.File(out / "data" / "slices" / f"{name}.h5") as f:
            assert f["image"].shape == f["label"].shape == SHAPE[1::-1]
            assert 0.0 <= f["image"][()].min() and f["image"][()].max() <= 1.0
            assert set(np.unique(f["label"][()])) <= {0, 1, 2, 3}
    assert not list(out.rglob("*.tmp*"))

    with pytest.raises(FileExistsError, match="not empty"):
        convert_acdc_raw_to_ssl4mis(raw_root, out)
    assert convert_acdc_raw_to_ssl4mis(raw_root, out, val_fraction=0.4, overwrite=True)["val"] != ["patient002"]


def _remove_info_cfg(case) -> Path:
    path = case.ed_image.parent / "Info.cfg"
    path.unlink()
    return path


def _drop_es_line(case) -> Path:
    path = case.ed_image.parent / "Info.cfg"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("ES")))
    return path


def _truncate_image(case) -> Path:
    data = case.es_image.read_bytes()
    case.es_image.write_bytes(data[: len(data) // 2])
    return case.es_image


def _save_label(case, label: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(label, np.diag([*SPACING, 1.0])), case.es_label)
    return case.es_label


def _mismatch_shape(case) -> Path:
    return _save_label(case, np.zeros((SHAPE[0], SHAPE[1] - 4, SHAPE[2]), np.uint8))


def _label_five(case) -> Path:
    label = np.asanyarray(nib.load(case.es_label).dataobj).copy()
    label[0, 0, 0] = 5
    return _save_label(case, label)


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (_remove_info_cfg, "cannot read"),
        (_drop_es_line, "no 'ES: "),
        (_truncate_image, "unreadable or truncated"),
        (_mismatch_shape, "differs from image"),
        (_label_five, r"label values \[5"),
    ],
)
def test_convert_rejects_bad_input_and_writes_nothing(
    raw_root, tmp_path, corrupt: Callable[..., Path], problem: str
):
    # The last patient is broken, so a converter that wrote while reading would already have written the others.
    bad_file = corrupt(list_raw_cases(raw_root)[-1])
    out = tmp_path / "ssl"
    with pytest.raises(DataError, match=problem) as error:
        convert_acdc_raw_to_ssl4mis(raw_root, out, val_patients=[1])
    assert str(bad_file) in str(error.value)
    assert not out.exists() or not any(out.iterdir())
