"""The SSL4MIS slice layout: datalists, splits by patient, the HDF5 loading transform and its errors (real ACDC)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from monai.transforms import Compose, EnsureChannelFirstd

from vessa_components.data import (
    FIXED_LABELED_CASES,
    DataError,
    LoadH5d,
    make_slice_datalist,
    parse_labeled_cases,
    select_labeled_patients,
)
from vessa_components.transforms import CheckLabelRanged

from .helpers import copy_acdc_subset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 3, 7])
def test_count_gives_published_fixed_cases(acdc_root, n):
    datalist = make_slice_datalist(acdc_root, labeled_cases=n)
    assert datalist["labeled_patients"] == list(FIXED_LABELED_CASES[n])
    assert {e["patient"] for e in datalist["labeled"]} == set(FIXED_LABELED_CASES[n])
    assert len(datalist["labeled"]) + len(datalist["unlabeled"]) == 1312
    assert not {e["patient"] for e in datalist["unlabeled"]} & set(FIXED_LABELED_CASES[n])
    assert all("label" not in e for e in datalist["unlabeled"])
    assert len(datalist["validation"]) == 20


def test_three_cases_slice_counts(acdc_root):
    datalist = make_slice_datalist(acdc_root, labeled_cases="3")
    listed = (acdc_root / "train_slices.list").read_text().split()
    expected = [n for n in listed if n.split("_frame")[0] in FIXED_LABELED_CASES[3]]
    assert [e["name"] for e in datalist["labeled"]] == expected
    assert len(datalist["unlabeled"]) == 1312 - len(expected)
    val = (acdc_root / "val.list").read_text().split()
    assert [Path(e["image"]).stem for e in datalist["validation"]] == val


def test_labeled_case_forms():
    patients = [f"patient{i:03d}" for i in (99, 38, 50, 100, 58, 21, 49, 20)]
    assert select_labeled_patients(patients, "099,038")[0] == ["patient099", "patient038"]
    assert select_labeled_patients(patients, ["patient050"])[0] == ["patient050"]
    frac_a = select_labeled_patients(patients, "25%", seed=1)[0]
    assert len(frac_a) == 2 and frac_a == select_labeled_patients(patients, 0.25, seed=1)[0]
    assert parse_labeled_cases("3") == 3 and parse_labeled_cases("0.05") == 0.05
    labeled, unlabeled = select_labeled_patients(patients, 3)
    assert labeled == patients[:3] and unlabeled == patients[3:]


def test_bad_labeled_cases(acdc_root, tmp_path):
    with pytest.raises(DataError, match="patient555"):
        make_slice_datalist(acdc_root, labeled_cases="patient555")
    with pytest.raises(DataError, match="train_slices.list"):
        make_slice_datalist(acdc_root, labeled_cases=500)
    with pytest.raises(DataError, match="does not exist"):
        make_slice_datalist(tmp_path / "nowhere")
    root = copy_acdc_subset(acdc_root, tmp_path / "small", ("patient099",))
    (root / "val.list").write_text("\n")
    with pytest.raises(DataError, match=r"val.list: list file is empty"):
        make_slice_datalist(root, labeled_cases=1)


def test_load_h5d_real_slice(acdc_root):
    datalist = make_slice_datalist(acdc_root, labeled_cases=1)
    item = datalist["labeled"][0]
    load = Compose([LoadH5d(["image", "label"]), EnsureChannelFirstd(["image", "label"], channel_dim="no_channel")])
    out = load(item)
    assert out["image"].shape == out["label"].shape and out["image"].shape[0] == 1
    assert out["image"].dtype.is_floating_point and 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert set(np.unique(out["label"].numpy()).tolist()) <= {0, 1, 2, 3}
    assert out["image"].meta["filename_or_obj"] == item["image"]
    unlabeled = LoadH5d(["image", "label"], allow_missing_keys=True)(datalist["unlabeled"][0])
    assert "label" not in unlabeled


def test_truncated_h5(acdc_root, tmp_path):
    src = acdc_root / "data" / "slices" / "patient099_frame01_slice_1.h5"
    bad = tmp_path / "patient099_frame01_slice_1.h5"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"patient099_frame01_slice_1\.h5.*(corrupt|truncated)"):
        LoadH5d(["image", "label"])({"image": str(bad), "label": str(bad)})


def test_shape_mismatch_and_label_range(tmp_path):
    path = tmp_path / "patient001_frame01_slice_0.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
        f["label"] = np.zeros((8, 6), np.uint8)
    with pytest.raises(DataError, match="patient001_frame01_slice_0.h5: image/label shape mismatch"):
        LoadH5d(["image", "label"])({"image": str(path), "label": str(path)})
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((8, 8), np.float32)
        f["label"] = np.full((8, 8), 7, np.uint8)
    loaded = LoadH5d(["image", "label"])({"image": str(path), "label": str(path)})
    with pytest.raises(DataError, match=r"patient001_frame01_slice_0.h5: label values \[7\]"):
        CheckLabelRanged("label", num_classes=4)(loaded)
    with pytest.raises(DataError, match="no dataset 'mask'"):
        LoadH5d("label", datasets="mask")({"label": str(path)})


def test_make_datalist_tool(acdc_root, tmp_path):
    out = tmp_path / "datalist.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "tools/make_datalist.py", "--layout", "ssl4mis", "--root", str(acdc_root)]
    subprocess.run([*cmd, "--labeled_cases", "099,038", "--out", str(out)], cwd=REPO_ROOT, env=env, check=True)
    datalist = json.loads(out.read_text())
    assert set(datalist) >= {"labeled", "unlabeled", "validation"}
    assert datalist["labeled_patients"] == ["patient099", "patient038"]
    # the failure path in-process: a subprocess per case would mostly time imports
    spec = importlib.util.spec_from_file_location("make_datalist_tool", REPO_ROOT / "tools" / "make_datalist.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(DataError, match="patient555"):
        tool.main(root=str(acdc_root), out=str(tmp_path / "x.json"), labeled_cases="patient555")
    assert not (tmp_path / "x.json").exists()


def test_volume_list_relative_to_root_or_working_dir(acdc_root, tmp_path, monkeypatch):
    from vessa_components.data import volume_datalist

    relative_root = os.path.relpath(acdc_root)
    assert len(volume_datalist(relative_root, "val.list")) == 20
    custom = tmp_path / "two.list"
    custom.write_text("patient028_frame01\npatient028_frame02\n")
    monkeypatch.chdir(tmp_path)
    assert [e["name"] for e in volume_datalist(acdc_root, "two.list")] == ["patient028_frame01", "patient028_frame02"]
