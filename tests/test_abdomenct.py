"""AbdomenCT-1K data layer on one real CT (TotalSegmentator labels): remapping, windowing, slicing, conversion to
the SSL4MIS slice layout, datalists, and the errors for each kind of bad input."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import fire
import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from vessa_components.data.abdomenct import (
    ABDOMENCT_CLASS_NAMES,
    TOTALSEGMENTATOR_TO_ABDOMENCT1K,
    axial_slices,
    convert_abdomenct_to_slices,
    find_abdomenct_cases,
    hu_window_transform,
    load_abdomenct_case,
    make_abdomenct_datalist,
    to_axial_stack,
)
from vessa_components.data.errors import DataError
from vessa_components.data.h5 import LoadH5d
from vessa_components.transforms.ct import RemapLabels, RemapLabelsd

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_NAME, SEG_NAME = "example_ct_sm.nii.gz", "example_seg.nii.gz"
TS_LIVER, TS_SPLEEN, TS_KIDNEYS, TS_PANCREAS = 5, 1, (2, 3), 7


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _add_case(release: Path, case: str, image: Path, label: Path) -> None:
    """Link a real image/mask pair into ``release/images`` and ``release/labels`` under a case id."""
    (release / "images").mkdir(parents=True, exist_ok=True)
    (release / "labels").mkdir(parents=True, exist_ok=True)
    (release / "images" / f"{case}_0000.nii.gz").symlink_to(image)
    (release / "labels" / f"{case}.nii.gz").symlink_to(label)


@pytest.fixture(scope="module")
def raw(abdomen_ct_dir):
    """The real CT and its TotalSegmentator mask as stored (RAS already), with their affine."""
    ct, seg = nib.load(abdomen_ct_dir / CT_NAME), nib.load(abdomen_ct_dir / SEG_NAME)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    return np.asarray(ct.dataobj), np.asarray(seg.dataobj), ct.affine


@pytest.fixture(scope="module")
def release(tmp_path_factory, abdomen_ct_dir, raw):
    """A three-case release (images/ and labels/, TotalSegmentator ids): the real CT, and the real CT flipped
    left-right (Case_00002) and front-back (Case_00003), written as new NIfTI files."""
    ct, seg, affine = raw
    root = tmp_path_factory.mktemp("release")
    _add_case(root, "Case_00001", abdomen_ct_dir / CT_NAME, abdomen_ct_dir / SEG_NAME)
    sources = root / "sources"
    sources.mkdir()
    for case, axis in (("Case_00002", 0), ("Case_00003", 1)):
        image = _save(np.flip(ct, axis).copy(), affine, sources / f"{case}_ct.nii.gz")
        label = _save(np.flip(seg, axis).copy(), affine, sources / f"{case}_seg.nii.gz")
        _add_case(root, case, image, label)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release):
    out = tmp_path_factory.mktemp("converted")
    summary = convert_abdomenct_to_slices(
        release / "images", out, label_dir=release / "labels", label_map="totalsegmentator", val_cases=["Case_00003"]
    )
    return out, summary


def test_totalsegmentator_preset_on_real_ct(abdomen_ct_dir, raw):
    _, seg, _ = raw
    case = load_abdomenct_case(abdomen_ct_dir / CT_NAME, abdomen_ct_dir / SEG_NAME, label_map="totalsegmentator")
    label = case["label"]
    assert label.dtype == np.uint8 and label.shape == seg.shape == (122, 101, 30)
    expected_values = {0} | {t for s, t in TOTALSEGMENTATOR_TO_ABDOMENCT1K.items() if (seg == s).any()}
    assert set(np.unique(label).tolist()) == expected_values == {0, 1, 2, 3, 4}
    assert (label == ABDOMENCT_CLASS_NAMES.index("liver")).sum() == (seg == TS_LIVER).sum()
    assert (label == ABDOMENCT_CLASS_NAMES.index("kidney")).sum() == np.isin(seg, TS_KIDNEYS).sum()
    assert (label == ABDOMENCT_CLASS_NAMES.index("spleen")).sum() == (seg == TS_SPLEEN).sum()
    assert (label == ABDOMENCT_CLASS_NAMES.index("pancreas")).sum() == (seg == TS_PANCREAS).sum()
    # the 37 other structures are background now
    assert (label == 0).sum() == (~np.isin(seg, [TS_LIVER, TS_SPLEEN, TS_PANCREAS, *TS_KIDNEYS])).sum()
    assert case["spacing"] == (3.0, 3.0, 3.0)
    assert case["image"].dtype == np.float32 and case["image"].min() < -500  # Hounsfield units, not yet windowed


def test_remap_labels_sends_everything_unmapped_to_background():
    remap = RemapLabels({5: 1, 2: 2, 3: 2})
    values = np.array([[0, 5, 2, 3], [4, 6, 200, -1]])
    np.testing.assert_array_equal(remap(values), [[0, 1, 2, 2], [0, 0, 0, 0]])
    out = remap(torch.tensor(values))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    assert out.tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]]
    data = RemapLabelsd(["label"], {7: 4}, allow_missing_keys=True)({"label": np.array([7.0, 1.0]), "image": 7})
    np.testing.assert_array_equal(data["label"], [4, 0])
    assert data["image"] == 7
    with pytest.raises(DataError, match="mask.nii.gz.*non-integer"):
        remap(np.array([1.0, 2.5]), source="mask.nii.gz")
    with pytest.raises(ValueError, match="do not fit"):
        RemapLabels({1: 300})


def test_hu_window_clips_and_scales():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(hu_window_transform()(hu)), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(np.asarray(hu_window_transform((-100, 100))(hu)), [0.0, 0.0, 0.7, 1.0, 1.0])
    with pytest.raises(ValueError, match="low < high"):
        hu_window_transform((240, -160))


def test_axial_slices_keep_spacing_and_radiological_view(abdomen_ct_dir):
    case = load_abdomenct_case(abdomen_ct_dir / CT_NAME, abdomen_ct_dir / SEG_NAME, label_map="totalsegmentator")
    slices = axial_slices(case["image"], case["spacing"], case["label"])
    assert len(slices) == 30
    assert [s["slice_index"] for s in slices] == list(range(30))
    assert all(s["spacing"] == (3.0, 3.0) and s["image"].shape == s["label"].shape == (101, 122) for s in slices)
    # rows anterior -> posterior, columns patient right -> left, slices inferior -> superior
    stack = np.stack([s["label"] for s in slices])
    liver, kidney, spleen = (
        np.argwhere(stack == ABDOMENCT_CLASS_NAMES.index(organ)).mean(0) for organ in ("liver", "kidney", "spleen")
    )
    assert liver[2] < stack.shape[2] / 2 < spleen[2]  # the liver lies on the patient's right: the viewer's left
    assert kidney[1] > liver[1]  # the kidneys lie behind the liver
    assert liver[0] > kidney[0]  # the liver dome lies above the kidneys
    # anisotropic voxels: in-plane spacing is reordered with the axes ([H, W] = [y, x])
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    anisotropic = axial_slices(volume, (0.7, 0.8, 5.0))
    assert len(anisotropic) == 6 and anisotropic[0]["image"].shape == (5, 4) and anisotropic[0]["spacing"] == (0.8, 0.7)
    assert "label" not in anisotropic[0]
    assert to_axial_stack(volume, (0.7, 0.8, 5.0))[1] == (5.0, 0.8, 0.7)


def test_converter_layout_and_round_trip(converted, abdomen_ct_dir, raw):
    out, summary = converted
    assert summary["train"] == ["Case_00001", "Case_00002"] and summary["validation"] == ["Case_00003"]
    names = (out / "train_slices.list").read_text().split()
    assert names == [f"Case_0000{c}_slice_{k}" for c in (1, 2) for k in range(30)]
    assert sorted(p.name for p in (out / "data" / "slices").iterdir()) == sorted(f"{n}.h5" for n in names)
    assert (out / "val.list").read_text().split() == ["Case_00003"]
    assert sorted(p.name for p in (out / "data").glob("*.h5")) == ["Case_00003.h5"]
    assert not (out / "test.list").exists()

    case = load_abdomenct_case(abdomen_ct_dir / CT_NAME, abdomen_ct_dir / SEG_NAME, label_map="totalsegmentator")
    expected = axial_slices(np.asarray(hu_window_transform()(case["image"])), case["spacing"], case["label"])
    for k in (0, 17):
        with h5py.File(out / "data" / "slices" / f"Case_00001_slice_{k}.h5") as f:
            assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
            np.testing.assert_allclose(f["image"][()], expected[k]["image"], atol=1e-6)
            np.testing.assert_array_equal(f["label"][()], expected[k]["label"])
            assert f["image"][()].min() >= 0.0 and f["image"][()].max() <= 1.0
            assert f.attrs["spacing"].tolist() == [3.0, 3.0]
            assert f.attrs["source"] == "Case_00001_0000.nii.gz" and f.attrs["slice_index"] == k
        # Case_00002 is Case_00001 flipped left-right: its slices are the same, mirrored
        with h5py.File(out / "data" / "slices" / f"Case_00002_slice_{k}.h5") as f:
            np.testing.assert_array_equal(f["label"][()], expected[k]["label"][:, ::-1])

    with h5py.File(out / "data" / "Case_00003.h5") as f:
        image, label = f["image"][()], f["label"][()]
        assert image.shape == label.shape == (30, 101, 122) and image.dtype == np.float32 and label.dtype == np.uint8
        assert f.attrs["spacing"].tolist() == [3.0, 3.0, 3.0]
    # Case_00003 is flipped front-back: the same slices, upside down
    np.testing.assert_array_equal(label, np.stack([s["label"] for s in expected])[:, ::-1, :])
    _, seg, _ = raw
    assert (label == 1).sum() == (seg == TS_LIVER).sum()

    # the files load in the training pipeline's loader, which carries the spacing in the affine
    slice_file = str(out / "data" / "slices" / "Case_00001_slice_17.h5")
    sample = LoadH5d(["image", "label"])({"image": slice_file, "label": slice_file})
    assert tuple(sample["image"].shape) == (101, 122)
    assert sample["image"].affine.diagonal().tolist() == [3.0, 3.0, 1.0]


def test_tool_drops_empty_slices_and_draws_splits(release, tmp_path):
    main = runpy.run_path(str(REPO_ROOT / "tools" / "prepare_abdomenct.py"))["main"]
    out = tmp_path / "out"
    command = [
        "--image_dir", str(release / "images"), "--label_dir", str(release / "labels"), "--out_dir", str(out),
        "--label_map", "{7: 4}", "--cases", "Case_00001,Case_00002,Case_00003", "--val_fraction", "0.3",
        "--test_fraction", "0.5", "--seed", "1", "--keep_empty_slices", "False", "--hu_window=-100,200",
    ]  # fmt: skip
    fire.Fire(main, command=command)
    val, test = (out / "val.list").read_text().split(), (out / "test.list").read_text().split()
    names = (out / "train_slices.list").read_text().split()
    # 30 % of 3 cases rounds up to one validation case, 50 % of the other two to one test case
    assert len(val) == len(test) == 1 and val != test
    assert sorted(p.stem for p in (out / "data").glob("*.h5")) == sorted(val + test)
    (train_case,) = {"Case_00001", "Case_00002", "Case_00003"} - set(val) - set(test)
    # only the pancreas is kept, and it spans slices 2..19 of the 30: the others are empty and dropped
    assert names == [f"{train_case}_slice_{k}" for k in range(2, 20)]
    for name in names:
        with h5py.File(out / "data" / "slices" / f"{name}.h5") as f:
            assert set(np.unique(f["label"][()]).tolist()) == {0, 4}
    assert '"hu_window": [\n        -100.0,\n        200.0\n    ]' in (out / "conversion.json").read_text()


def test_datalist_splits_by_case(converted):
    root, _ = converted
    datalist = make_abdomenct_datalist(root, labeled_fraction=0.05, seed=0)
    labeled_cases = {e["patient"] for e in datalist["labeled"]}
    unlabeled_cases = {e["patient"] for e in datalist["unlabeled"]}
    assert len(labeled_cases) == 1 and len(unlabeled_cases) == 1  # 5 % of 2 cases rounds up to one
    assert labeled_cases | unlabeled_cases == {"Case_00001", "Case_00002"}
    assert len(datalist["labeled"]) == len(datalist["unlabeled"]) == 30
    assert all(e["image"] == e["label"] and Path(e["image"]).is_absolute() for e in datalist["labeled"])
    assert all("label" not in e and Path(e["image"]).is_file() for e in datalist["unlabeled"])
    assert datalist["validation"] == [
        {"image": str(root / "data" / "Case_00003.h5"), "label": str(root / "data" / "Case_00003.h5"),
         "patient": "Case_00003", "name": "Case_00003"}
    ]  # fmt: skip
    assert make_abdomenct_datalist(root, labeled_fraction=0.05, seed=0) == datalist  # the seed fixes the draw

    chosen = make_abdomenct_datalist(root, labeled_cases=["Case_00002"])
    assert {e["patient"] for e in chosen["labeled"]} == {"Case_00002"}
    assert {e["patient"] for e in chosen["unlabeled"]} == {"Case_00001"}
    supervised = make_abdomenct_datalist(root, labeled_fraction=1.0)
    assert len(supervised["labeled"]) == 60 and supervised["unlabeled"] == []


@pytest.mark.parametrize("cases", [["Case_00009"], ["Case_00003"]], ids=["unknown", "validation-case"])
def test_datalist_rejects_cases_outside_training(converted, cases):
    root, _ = converted
    with pytest.raises(DataError, match=rf"train_slices\.list.*{cases[0]}"):
        make_abdomenct_datalist(root, labeled_cases=cases)


def test_datalist_rejects_empty_splits(converted, tmp_path):
    root, _ = converted
    with pytest.raises(DataError, match=r"train_slices\.list.*empty"):
        make_abdomenct_datalist(root, labeled_cases=[])
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    one_case = [n for n in (copy / "train_slices.list").read_text().split() if n.startswith("Case_00001")]
    (copy / "train_slices.list").write_text("\n".join(one_case) + "\n")
    with pytest.raises(DataError, match=r"train_slices\.list.*no unlabelled"):
        make_abdomenct_datalist(copy, labeled_fraction=0.05)
    (copy / "val.list").write_text("")
    with pytest.raises(DataError, match=r"val\.list.*empty"):
        make_abdomenct_datalist(copy, labeled_fraction=1.0)


def _broken_release(tmp_path: Path, abdomen_ct_dir: Path, raw, problem: str) -> tuple[Path, str]:
    """A release in AbdomenCT-1K ids whose first case is the good real CT (its mask remapped) and whose second case
    has ``problem``; returns the folder and the file name the error must name."""
    ct, seg, affine = raw
    release = tmp_path / "release"
    good_label = _save(RemapLabels(TOTALSEGMENTATOR_TO_ABDOMENCT1K)(seg), affine, tmp_path / "good.nii.gz")
    _add_case(release, "Case_00001", abdomen_ct_dir / CT_NAME, good_label)
    image, label = release / "images" / "Case_00002_0000.nii.gz", release / "labels" / "Case_00002.nii.gz"
    _save(ct, affine, image)
    if problem == "truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
        _save(seg, affine, label)
        return release, image.name
    if problem == "missing_mask":
        return release, label.name
    if problem == "shape":
        _save(seg[:, :, :-1], affine, label)
    elif problem in ("spacing", "position"):
        moved = affine.copy()
        if problem == "spacing":
            moved[0, 0] = 3.5
        else:
            moved[:3, 3] += 10.0
        _save(seg, moved, label)
    elif problem == "raw_ids":  # TotalSegmentator ids given as if they were AbdomenCT-1K ids
        _save(seg, affine, label)
    return release, label.name


@pytest.mark.parametrize(
    "problem, message",
    [
        ("truncated", "unreadable NIfTI"),
        ("missing_mask", "mask of image Case_00002_0000.nii.gz not found"),
        ("shape", r"shape \(122, 101, 29\) differs"),
        ("spacing", r"voxel size \[3.5, 3.0, 3.0\] mm differs"),
        ("position", "affine differs"),
        ("raw_ids", r"label values \[5, 6, .*outside the declared classes 0..4; pass label_map"),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, abdomen_ct_dir, raw, problem, message):
    release, bad_file = _broken_release(tmp_path, abdomen_ct_dir, raw, problem)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as error:
        convert_abdomenct_to_slices(
            release / "images", out, label_dir=release / "labels", label_map=None, val_cases=["Case_00001"]
        )
    assert Path(error.value.path).name == bad_file and bad_file in str(error.value)
    assert not out.exists()


def test_bad_case_selection_raises(release, tmp_path):
    out = tmp_path / "out"
    images, labels = release / "images", release / "labels"
    with pytest.raises(DataError, match=r"images.*\['Case_00007'\] have no image"):
        find_abdomenct_cases(images, labels, cases=["Case_00001", "Case_00007"])
    with pytest.raises(DataError, match=r"images.*val cases \['Case_00007'\]"):
        convert_abdomenct_to_slices(images, out, labels, "totalsegmentator", val_cases=["Case_00007"])
    with pytest.raises(DataError, match=r"images.*\['Case_00002'\] are both validation and test"):
        convert_abdomenct_to_slices(images, out, labels, val_cases=["Case_00002"], test_cases=["Case_00002"])
    with pytest.raises(DataError, match="no training case left"):
        convert_abdomenct_to_slices(images, out, labels, cases=["Case_00001"], val_cases=["Case_00001"])
    with pytest.raises(DataError, match="no '<case>_0000.nii.gz' images"):
        convert_abdomenct_to_slices(release / "labels", out)
    assert not out.exists()


def test_find_cases_with_masks_beside_images(abdomen_ct_dir, tmp_path):
    (tmp_path / "Case_00001_0000.nii.gz").symlink_to(abdomen_ct_dir / CT_NAME)
    (tmp_path / "Case_00001.nii.gz").symlink_to(abdomen_ct_dir / SEG_NAME)
    (tmp_path / "Case_00002_0000.nii.gz").symlink_to(abdomen_ct_dir / CT_NAME)
    image, label = str(tmp_path / "Case_00001_0000.nii.gz"), str(tmp_path / "Case_00001.nii.gz")
    assert find_abdomenct_cases(tmp_path, cases=["Case_00001"]) == [{"case": "Case_00001", "image": image, "label": label}]
    with pytest.raises(DataError, match=r"Case_00002\.nii\.gz: mask of image Case_00002_0000\.nii\.gz not found"):
        find_abdomenct_cases(tmp_path)
