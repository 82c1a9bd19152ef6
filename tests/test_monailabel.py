"""vessa_ssl_acdc served by a real MONAI Label server (the monaibundle sample app with tools/monailabel_app/main.py on
top), started by docs/run_monailabel.sh.

MONAI Label conflicts with the main environment, so it lives in .venv-monailabel (tools/install_monailabel.sh builds
it on first use; later runs reuse it). The studies folder holds real ACDC validation volumes as NIfTI, two of them with
labels for MONAI Label's training request.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.bundle import ConfigParser

from .helpers import copy_acdc_subset

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_ssl_acdc"
MODEL = "vessa_ssl_acdc"
SPACING = (1.5, 1.5, 8.0)  # mm, (x, y, z) as NIfTI stores it; the SSL4MIS release keeps no spacing
# a few iterations of a small pipeline (the test's copy of the bundle; the hyper-parameters are top-level scalars)
FAST_TRAIN = {
    "val_interval": 2, "roi_size": 64, "batch_size": 1, "num_workers": 0, "cache_rate": 0.0,
    "show_progress": False, "labeled_cases": 1, "data_layout": "ssl4mis",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_nifti(array_zyx: np.ndarray, path: Path, dtype) -> None:
    """An SSL4MIS (z, y, x) array as NIfTI in (x, y, z) order, as scanners' NIfTI files are laid out."""
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0).astype(dtype), np.diag([*SPACING, 1.0])), path)


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["nice", "-n", "10", "bash", str(REPO_ROOT / "tools" / "install_monailabel.sh")], check=True, env=env, timeout=3600)
    return REPO_ROOT / ".venv-monailabel"


@pytest.fixture(scope="module")
def served(tmp_path_factory, acdc_root, monailabel_venv):
    """A running server: yields (base URL, studies folder, served bundle folder, ids of the studies, its log file)."""
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    ids = (acdc_root / "val.list").read_text().split()[:3]
    for i, name in enumerate(ids):
        with h5py.File(acdc_root / "data" / f"{name}.h5", "r") as f:
            _write_nifti(f["image"][()], studies / f"{name}.nii.gz", np.float32)
            if i < 2:  # two labelled pairs for training; the third is only an image
                _write_nifti(f["label"][()], studies / "labels" / "final" / f"{name}.nii.gz", np.uint8)

    bundle = root / "model_store" / MODEL
    for sub in ("configs", "docs"):
        shutil.copytree(BUNDLE / sub, bundle / sub)
    shutil.copy(BUNDLE / "LICENSE", bundle / "LICENSE")
    train_cfg = json.loads((bundle / "configs" / "train.json").read_text())
    own_data = copy_acdc_subset(acdc_root, root / "acdc_small", ("patient099",), slice_step=4, n_volumes=1)
    train_cfg.update(FAST_TRAIN, dataset_dir=str(own_data))
    (bundle / "configs" / "train.json").write_text(json.dumps(train_cfg, indent=4))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.manual_seed(0)
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")

    port = _free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "BUNDLE_DIR": str(bundle)}
    server = subprocess.Popen(
        ["bash", str(REPO_ROOT / "docs" / "run_monailabel.sh"), str(studies), str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                pytest.fail(f"MONAI Label exited with {server.returncode}:\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"MONAI Label did not start:\n{(root / 'server.log').read_text()[-4000:]}")
            time.sleep(2)
        yield url, studies, bundle, ids, root / "server.log"
    finally:
        server.terminate()  # bash exec'ed the server: this is the server's own process
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _infer(url: str, **kwargs) -> requests.Response:
    return requests.post(f"{url}/infer/{MODEL}", timeout=600, **kwargs)


def test_info_lists_the_bundle_with_its_labels(served):
    url, _, bundle, _, _ = served
    info = requests.get(f"{url}/info/", timeout=30).json()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    expected = {name.lower(): int(index) for index, name in channels.items() if name.lower() != "background"}
    assert info["models"][MODEL]["labels"] == expected
    assert info["models"][MODEL]["version"] == meta["version"]
    assert MODEL in info["trainers"] and info["trainers"][MODEL]["config"]["method"] == "unimatch_v2"


def test_infer_returns_a_label_map_on_the_volume_grid(served, tmp_path):
    url, studies, _, ids, _ = served
    response = _infer(url, params={"image": ids[2], "output": "image"})
    assert response.status_code == 200, response.text[:500]
    (tmp_path / "pred.nii.gz").write_bytes(response.content)
    pred, image = nib.load(tmp_path / "pred.nii.gz"), nib.load(studies / f"{ids[2]}.nii.gz")
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 3}

    response = _infer(url, params={"image": ids[2], "output": "json"})
    assert response.status_code == 200
    assert response.json()["label_names"] == {"right ventricle": 1, "myocardium": 2, "left ventricle": 3}


def test_bad_requests_fail_with_a_reason_and_the_server_keeps_serving(served, tmp_path):
    url, _, _, ids, server_log = served
    missing = _infer(url, params={"image": "patient999_frame01", "output": "image"})
    (tmp_path / "corrupt.nii.gz").write_bytes(os.urandom(4096))
    with open(tmp_path / "corrupt.nii.gz", "rb") as f:
        corrupt = _infer(url, params={"output": "image"}, files={"file": ("corrupt.nii.gz", f)})
    nib.save(nib.Nifti1Image(np.random.rand(64, 64).astype(np.float32), np.eye(4)), tmp_path / "slice2d.nii.gz")
    with open(tmp_path / "slice2d.nii.gz", "rb") as f:
        flat = _infer(url, params={"output": "image"}, files={"file": ("slice2d.nii.gz", f)})
    # the app answers with the reason (the bundle's CheckImageFiled names the file and the problem), not a bare 500
    assert missing.status_code == 404, missing.text
    assert missing.json()["detail"] == "image 'patient999_frame01' is not in the studies folder"
    assert corrupt.status_code == 422, corrupt.text
    assert "not a readable NIfTI image (corrupt or truncated upload?)" in corrupt.json()["detail"]
    assert corrupt.json()["detail"].startswith("DataError: /")  # the uploaded file's path
    assert flat.status_code == 422, flat.text
    assert "'image': expected a 3D image, got shape (64, 64) (2D)" in flat.json()["detail"]
    assert "expected a 3D image" in server_log.read_text()

    again = _infer(url, params={"image": ids[0], "output": "image"})
    assert again.status_code == 200 and len(again.content) > 0


def test_training_request_on_the_labelled_pairs(served):
    url, _, bundle, ids, _ = served
    before = (bundle / "models" / "model.pt").read_bytes()
    response = requests.post(
        f"{url}/train/{MODEL}",
        params={"run_sync": "true"},
        json={"max_epochs": 1, "val_split": 0.5, "device": "cpu", "multi_gpu": False, "method": "supervised"},
        timeout=900,
    )
    assert response.status_code == 200, response.text[:500]
    # one labelled pair trained (2 iterations), the other validated; the best teacher replaced models/model.pt
    metrics = json.loads((bundle / "validation" / "metrics.json").read_text())
    assert metrics["num_volumes"] == 1
    after = (bundle / "models" / "model.pt").read_bytes()
    assert after != before
    served_again = _infer(url, params={"image": ids[2], "output": "image"})
    assert served_again.status_code == 200
