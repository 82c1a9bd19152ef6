"""The synthetic ACDC demo data: deterministic, anatomically plausible, labelled synthetic, and converted to the
SSL4MIS layout exactly like the real release (compared with a real file)."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from vessa_components.data.acdc_raw import list_raw_cases
from vessa_components.data.demo import SYNTHETIC_GROUP, SYNTHETIC_MARKER, make_demo_acdc


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """Three patients at the default size, seed 0."""
    root = tmp_path_factory.mktemp("demo") / "raw"
    make_demo_acdc(root, n_patients=3, seed=0)
    return root


def _voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_same_seed_gives_same_data_and_other_seed_differs(demo_root, tmp_path):
    make_demo_acdc(tmp_path / "same", n_patients=1, seed=0)
    make_demo_acdc(tmp_path / "other", n_patients=1, seed=1)
    reference = list_raw_cases(demo_root)[0]
    same, other = list_raw_cases(tmp_path / "same")[0], list_raw_cases(tmp_path / "other")[0]
    assert (same.ed_frame, same.es_frame) == (reference.ed_frame, reference.es_frame)
    for field in ("ed_image", "ed_label", "es_image", "es_label"):
        np.testing.assert_array_equal(_voxels(getattr(same, field)), _voxels(getattr(reference, field)))
    assert not np.array_equal(_voxels(other.ed_image), _voxels(reference.ed_image))


def test_every_output_is_labelled_synthetic(demo_root):
    assert "synthetic" in (demo_root / SYNTHETIC_MARKER).read_text().lower()
    assert "not real" in (demo_root / "README.md").read_text().lower()
    for case in list_raw_cases(demo_root):
        assert case.group == SYNTHETIC_GROUP
        for path in (case.ed_image, case.ed_label, case.es_image, case.es_label):
            assert b"SYNTHETIC" in nib.load(path).header["descrip"].item()


def test_refuses_to_write_into_a_folder_of_real_data(tmp_path):
    (tmp_path / "patient001").mkdir()
    with pytest.raises(FileExistsError, match="not synthetic"):
        make_demo_acdc(tmp_path, n_patients=1)


def test_anatomy_is_plausible(demo_root):
    for case in list_raw_cases(demo_root):
        assert case.spacing[2] > 2 * max(case.spacing[:2])  # thick short-axis slices
        image = nib.load(case.ed_image)
        assert np.allclose(np.diag(image.affine)[:3], case.spacing)
        volumes = {}
        phases = (("ED", case.ed_image, case.ed_label), ("ES", case.es_image, case.es_label))
        for phase, image_path, label_path in phases:
            image, label = _voxels(image_path).astype(float), _voxels(label_path)
            n_slices = label.shape[2]
            assert set(np.unique(label[:, :, n_slices // 2])) == {0, 1, 2, 3}
            # The LV cavity is enclosed by myocardium: its in-plane neighbours are LV or myocardium only.
            lv = label == 3
            in_plane = ndimage.generate_binary_structure(2, 1)[:, :, None]  # arrays are (x, y, z)
            ring = ndimage.binary_dilation(lv, structure=in_plane) & ~lv
            assert set(np.unique(label[ring])) == {2}
            # bSSFP contrast: bright blood, dark myocardium.
            assert image[lv].mean() > 1.5 * image[label == 2].mean()
            heart_area = (label > 0).sum(axis=(0, 1))
            assert heart_area[0] > heart_area[-1] > 0  # the heart tapers toward the apex
            volumes[phase] = {k: (label == k).sum() for k in (1, 2, 3)}
        assert volumes["ED"][3] > 1.3 * volumes["ES"][3]  # the LV ejects
        assert volumes["ED"][1] > volumes["ES"][1]


def test_converted_demo_matches_real_ssl4mis_files(acdc_root, tmp_path):
    spacing = (1.25, 1.5, 8.0)  # distinct x / y spacing and a non-square grid expose any axis swap
    summary = make_demo_acdc(
        tmp_path / "raw", n_patients=5, seed=3, shape=(40, 48, 5), spacing=spacing, ssl4mis_root=tmp_path / "ssl"
    )
    out = tmp_path / "ssl"
    split = summary["ssl4mis"]
    assert (len(split["train"]), len(split["val"]), split["test"]) == (4, 1, [])
    assert (out / SYNTHETIC_MARKER).is_file()

    train_slices = (out / "train_slices.list").read_text().split()
    assert sorted(train_slices) == sorted(
        f"{p}_frame0{f}_slice_{k}" for p in split["train"] for f in (1, 2) for k in range(1, 6)
    )
    assert (out / "val.list").read_text().split() == [f"{split['val'][0]}_frame01", f"{split['val'][0]}_frame02"]
    assert (out / "test.list").read_text() == ""
    # Slice numbers start at 1, as in the real release.
    assert min(int(name.rsplit("_", 1)[1]) for name in (acdc_root / "train_slices.list").read_text().split()) == 1

    real_volume = h5py.File(next((acdc_root / "data").glob("*.h5")))
    real_slice_name = (acdc_root / "train_slices.list").read_text().split()[0]
    real_slice = h5py.File(acdc_root / "data" / "slices" / f"{real_slice_name}.h5")
    case = {c.patient: c for c in list_raw_cases(tmp_path / "raw")}[split["val"][0]]
    with real_volume, real_slice, h5py.File(out / "data" / f"{case.patient}_frame02.h5") as volume, h5py.File(
        out / "data" / "slices" / f"{train_slices[0]}.h5"
    ) as slice_:
        for ours, real in ((volume, real_volume), (slice_, real_slice)):
            assert set(ours.keys()) == set(real.keys()) == {"image", "label"}
            for key in ("image", "label"):
                assert (ours[key].dtype, ours[key].ndim) == (real[key].dtype, real[key].ndim)
        # Same array as the SSL4MIS processing: SimpleITK's [z, y, x] voxel order, min-max normalised; frame02 = ES.
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case.es_image))).astype(np.float32)
        reference = (reference - reference.min()) / (reference.max() - reference.min())
        assert volume["image"].shape == (5, 48, 40)
        np.testing.assert_allclose(volume["image"][()], reference, atol=1e-6)
        np.testing.assert_array_equal(volume["label"][()], sitk.GetArrayFromImage(sitk.ReadImage(str(case.es_label))))
        assert (volume["image"][()].min(), volume["image"][()].max()) == (0.0, 1.0)
        np.testing.assert_allclose(volume.attrs["spacing"], spacing[::-1])
        assert slice_["image"].shape == (48, 40)
        np.testing.assert_allclose(slice_.attrs["spacing"], spacing[1::-1])
