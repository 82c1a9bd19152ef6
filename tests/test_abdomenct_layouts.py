"""The CT data layouts of prepare_dataset: the synthetic abdominal CT demo set, the conversion of a real CT folder
(file suffixes, label maps by class name, axial parts for a one-case set, reconversion when settings change) and the
inference input list."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from vessa_components.data import (
    ABDOMENCT_CLASS_NAMES,
    SYNTHETIC_MARKER,
    TOTALSEGMENTATOR_TO_ABDOMENCT1K,
    DataError,
    abdomenct_folders,
    convert_abdomenct_to_slices,
    find_abdomenct_cases,
    image_datalist,
    load_abdomenct_case,
    make_demo_abdomenct,
    prepare_dataset,
    resolve_label_map,
)
from vessa_components.data.abdomenct import to_axial_stack

CT_NAME, SEG_NAME = "example_ct_sm.nii.gz", "example_seg.nii.gz"
EXAMPLE_SUFFIXES = {"image_suffix": "_ct_sm.nii.gz", "label_suffix": "_seg.nii.gz"}


def test_demo_set_is_synthetic_deterministic_and_plausible(tmp_path):
    summary = make_demo_abdomenct(tmp_path / "a", n_cases=2, seed=0)
    make_demo_abdomenct(tmp_path / "b", n_cases=1, seed=0)
    make_demo_abdomenct(tmp_path / "c", n_cases=1, seed=1)
    assert summary["cases"] == ["Case_00001", "Case_00002"]
    assert "synthetic" in (tmp_path / "a" / SYNTHETIC_MARKER).read_text().lower()
    assert "not real" in (tmp_path / "a" / "README.md").read_text().lower()
    image = nib.load(tmp_path / "a" / "Case_00001_0000.nii.gz")
    label = nib.load(tmp_path / "a" / "Case_00001.nii.gz")
    for stored in (image, label):
        assert b"SYNTHETIC" in stored.header["descrip"].item() and nib.aff2axcodes(stored.affine) == ("R", "A", "S")
    hu, ids = np.asarray(image.dataobj), np.asarray(label.dataobj)
    # case k does not depend on how many cases are drawn; another seed draws another case
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b" / "Case_00001_0000.nii.gz").dataobj), hu)
    assert not np.array_equal(np.asarray(nib.load(tmp_path / "c" / "Case_00001_0000.nii.gz").dataobj), hu)

    assert hu.dtype == np.int16 and hu.min() <= -900 and ids.dtype == np.uint8
    assert set(np.unique(ids).tolist()) == set(range(len(ABDOMENCT_CLASS_NAMES)))
    centre = {name: np.argwhere(ids == k).mean(0) for k, name in enumerate(ABDOMENCT_CLASS_NAMES) if k}
    mean_hu = {name: hu[ids == k].mean() for k, name in enumerate(ABDOMENCT_CLASS_NAMES) if k}
    middle = (np.array(ids.shape) - 1) / 2
    # RAS+: x grows toward the patient's right, y toward the front
    assert centre["liver"][0] > middle[0] > centre["spleen"][0]
    assert centre["kidney"][1] < centre["liver"][1] and centre["kidney"][1] < middle[1]
    assert (ids == 1).sum() > (ids == 3).sum() > (ids == 4).sum()  # liver > spleen > pancreas
    assert mean_hu["kidney"] > mean_hu["liver"] > mean_hu["pancreas"] and -160 < mean_hu["pancreas"] < 240

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "Case_00001_0000.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not synthetic"):
        make_demo_abdomenct(tmp_path / "real", n_cases=1)


def test_label_map_by_class_name():
    by_name = {"5": "liver", "2": "Kidney", 3: "kidney", "1": "spleen", 7: 4}
    assert resolve_label_map(by_name) == TOTALSEGMENTATOR_TO_ABDOMENCT1K
    assert resolve_label_map("totalsegmentator") == TOTALSEGMENTATOR_TO_ABDOMENCT1K and resolve_label_map(None) is None
    with pytest.raises(ValueError, match=r"unknown class name 'gallbladder' \(for source id 4\).*'pancreas'"):
        resolve_label_map({4: "gallbladder"})
    with pytest.raises(ValueError, match="must be integers or class names"):
        resolve_label_map({"left": 1})


def test_suffixes_and_folders(tmp_path, abdomen_ct_dir):
    (tmp_path / "a.nii.gz").symlink_to(abdomen_ct_dir / CT_NAME)
    (tmp_path / "a_seg.nii.gz").symlink_to(abdomen_ct_dir / SEG_NAME)
    # masks share the images' ending: they are recognised as masks, not as images of a case "a_seg"
    assert find_abdomenct_cases(tmp_path, image_suffix=".nii.gz", label_suffix="_seg.nii.gz") == [
        {"case": "a", "image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "a_seg.nii.gz")}
    ]
    assert abdomenct_folders(tmp_path) == (tmp_path, tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    assert abdomenct_folders(tmp_path) == (tmp_path / "images", tmp_path / "labels")


def test_axial_parts(tmp_path, abdomen_ct_dir):
    summary = convert_abdomenct_to_slices(
        abdomen_ct_dir, tmp_path, label_map="totalsegmentator", axial_parts=4, val_cases=["example_part1"],
        **EXAMPLE_SUFFIXES,
    )  # fmt: skip
    # 30 slices in parts of 8, 8, 7, 7 (inferior to superior); part 1 (slices 8..15) is the validation volume
    assert summary["train"] == ["example_part0", "example_part2", "example_part3"]
    names = (tmp_path / "train_slices.list").read_text().split()
    expected = [(0, range(0, 8)), (2, range(16, 23)), (3, range(23, 30))]
    assert names == [f"example_part{p}_slice_{k}" for p, ks in expected for k in ks]
    case = load_abdomenct_case(abdomen_ct_dir / CT_NAME, abdomen_ct_dir / SEG_NAME, label_map="totalsegmentator")
    stack, _ = to_axial_stack(case["label"], case["spacing"])
    with h5py.File(tmp_path / "data" / "example_part1.h5") as f:
        assert f["image"].shape == (8, 101, 122) and f.attrs["first_slice_index"] == 8
        assert f.attrs["spacing"].tolist() == [3.0, 3.0, 3.0]
        np.testing.assert_array_equal(f["label"][()], stack[8:16])
    with h5py.File(tmp_path / "data" / "slices" / "example_part2_slice_16.h5") as f:
        np.testing.assert_array_equal(f["label"][()], stack[16])
    with pytest.raises(DataError, match="30 axial slices cannot be cut into 31 parts"):
        convert_abdomenct_to_slices(
            abdomen_ct_dir, tmp_path / "bad", label_map="totalsegmentator", axial_parts=31, **EXAMPLE_SUFFIXES
        )
    assert not (tmp_path / "bad").exists()


def test_prepare_one_case_and_reconvert_on_new_settings(tmp_path, abdomen_ct_dir):
    work = tmp_path / "work"
    options = {"label_map": "totalsegmentator", **EXAMPLE_SUFFIXES}
    with pytest.warns(UserWarning, match="only 1 case"):
        root = Path(prepare_dataset(abdomen_ct_dir, "abdomenct", work, **options))
    settings = json.loads((root / "prepared.json").read_text())
    assert settings["axial_parts"] == 5 and settings["hu_window"] == [-160.0, 240.0]
    assert len((root / "val.list").read_text().split()) == 1
    assert len((root / "train_slices.list").read_text().split()) == 24
    stamp = (root / "prepared.json").stat().st_mtime_ns
    first_slice = sorted((root / "data" / "slices").iterdir())[0]
    with h5py.File(first_slice) as f:
        before = f["image"][()]

    with pytest.warns(UserWarning, match="only 1 case"):
        assert prepare_dataset(abdomen_ct_dir, "abdomenct", work, **options) == str(root)
    assert (root / "prepared.json").stat().st_mtime_ns == stamp  # same settings: reused

    with pytest.warns(UserWarning, match="converting again"):
        prepare_dataset(abdomen_ct_dir, "abdomenct", work, hu_window=(-100, 200), **options)
    assert json.loads((root / "prepared.json").read_text())["hu_window"] == [-100.0, 200.0]
    with h5py.File(first_slice) as f:
        assert not np.allclose(f["image"][()], before)


def test_image_datalist(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    assert image_datalist(tmp_path) == [{"image": str(tmp_path / "a.nii")}, {"image": str(tmp_path / "b.nii.gz")}]
    assert image_datalist(tmp_path / "nowhere", allow_empty=True) == []
    with pytest.raises(DataError, match=r"nowhere: input folder not found"):
        image_datalist(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no input file matches '\*_0000.nii.gz'"):
        image_datalist(tmp_path, "*_0000.nii.gz")
