"""The vessa_ssl_acdc bundle on real ACDC slices: train, resume, evaluate, infer on NIfTI, export, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, ckpt_export

from vessa_components.data import DataError
from vessa_components.metrics import compute_volume_metrics
from vessa_components.networks import build_student

from .helpers import copy_acdc_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_ssl_acdc"
CONFIGS = BUNDLE / "configs"
FAST = {"roi_size": 64, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False}


@pytest.fixture(scope="module")
def small_acdc(tmp_path_factory, acdc_root) -> Path:
    """Real ACDC slices of three training patients and two real validation volumes, in the SSL4MIS layout."""
    return copy_acdc_subset(
        acdc_root, tmp_path_factory.mktemp("acdc_small"), ("patient099", "patient038", "patient050"), slice_step=2
    )


def _workflow(configs, workflow_type, output_dir, dataset_dir, **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / c) for c in configs]
    settings = {**FAST, "data_layout": "ssl4mis", **overrides}
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        dataset_dir=str(dataset_dir),
        **settings,
    )
    workflow.initialize()
    return workflow


def test_properties(tmp_path, small_acdc):
    train = _workflow(["train.json"], "train", tmp_path, small_acdc)
    assert not train.check_properties()
    infer = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(BUNDLE))
    infer.initialize()
    assert not infer.check_properties()


def test_train_resume_evaluate_infer_export(tmp_path, small_acdc):
    out = tmp_path / "run"
    common = {"labeled_cases": 1, "val_interval": 2, "save_interval": 2}
    train = _workflow(["train.json"], "train", out, small_acdc, max_iterations=4, **common)
    train.run()
    model_path = out / "models" / "model.pt"
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    build_student("unet").load_state_dict(state)  # a flat state_dict of network_def
    assert (out / "checkpoints" / "checkpoint_iteration=4.pt").is_file()
    assert json.loads((out / "validation" / "metrics.json").read_text())["num_volumes"] == 2
    train.finalize()

    resumed = _workflow(["train.json"], "train", out, small_acdc, max_iterations=6, resume=True, **common)
    trainer = resumed.parser.get_parsed_content("train#trainer")
    ran = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ran.append(e.state.iteration))
    resumed.run()
    assert ran == [5, 6]
    assert (out / "checkpoints" / "checkpoint_iteration=6.pt").is_file()
    resumed.finalize()

    evaluate = _workflow(["train.json", "evaluate.json"], "eval", out, small_acdc)
    evaluate.run()
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(report["per_volume"]) == set((small_acdc / "val.list").read_text().split())
    assert (out / "eval" / "metrics.md").read_text().startswith("| Class |")

    # the same volume as NIfTI in its (x, y, z) orientation, segmented by inference.json
    volume = (small_acdc / "val.list").read_text().split()[0]
    with h5py.File(small_acdc / "data" / f"{volume}.h5") as f:
        image, label = f["image"][()], f["label"][()]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.diag([1.5, 1.5, 8.0, 1.0])), inputs / f"{volume}.nii.gz")
    infer = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(out),
        dataset_dir=str(inputs), output_dir=str(tmp_path / "pred"), roi_size=64,
    )
    infer.initialize()
    infer.run()
    pred_file = tmp_path / "pred" / f"{volume}_seg.nii.gz"
    pred = np.asarray(nib.load(pred_file).dataobj)
    assert pred.shape == image.transpose(2, 1, 0).shape and set(np.unique(pred)) <= {0, 1, 2, 3}
    # inference and evaluation run the same network on the same pixels: identical Dice
    dice = compute_volume_metrics(pred.transpose(2, 1, 0), label, ["bg", "rv", "myo", "lv"])
    for ours, theirs in zip(("rv", "myo", "lv"), ("right_ventricle", "myocardium", "left_ventricle")):
        assert dice[ours]["dice"] == pytest.approx(report["per_volume"][volume][theirs]["dice"], abs=1e-6)

    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(ts_path), ckpt_file=str(model_path),
        meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"), bundle_root=str(out),
    )
    scripted = torch.jit.load(str(ts_path))
    assert scripted(torch.rand(1, 1, 64, 64)).shape == (1, 4, 64, 64)


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"method": "fixmatch"}, ValueError, "unknown method 'fixmatch'"),
        ({"network_name": "resnet"}, ValueError, "unknown network 'resnet'"),
        ({"labeled_cases": "patient555"}, DataError, "patient555"),
        ({"data_layout": "nifti"}, ValueError, "unknown data_layout 'nifti'"),
    ],
)
def test_bad_settings(tmp_path, small_acdc, override, error, message):
    workflow = _workflow(["train.json"], "train", tmp_path, small_acdc, max_iterations=2, val_interval=2, **override)
    with pytest.raises(Exception) as info:
        workflow.run()
    chain, cause = [], info.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, error) and message in str(e) for e in chain), chain


def test_missing_dataset_dir(tmp_path):
    workflow = _workflow(["train.json"], "train", tmp_path, tmp_path / "nowhere", max_iterations=2, val_interval=2)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "nowhere: dataset_dir does not exist" in repr(info.value.__cause__) or "nowhere" in str(info.getrepr())


def test_corrupt_slice_mid_training_keeps_model(tmp_path, small_acdc):
    data = tmp_path / "data_copy"
    shutil.copytree(small_acdc, data)
    unlabeled = sorted((data / "data" / "slices").glob("patient050*.h5"))
    for path in unlabeled:
        path.write_bytes(path.read_bytes()[:200])
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    good = build_student("unet").state_dict()
    torch.save(good, out / "models" / "model.pt")
    workflow = _workflow(["train.json"], "train", out, data, labeled_cases=2, max_iterations=4, val_interval=2)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert "patient050" in str(info.getrepr()) and "corrupt or truncated" in str(info.getrepr())
    kept = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], good[k]) for k in good)


@pytest.mark.slow
def test_cli_main_command_on_demo_data(tmp_path):
    """The README's main command, on the embedded synthetic default, for a few iterations."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
        "--bundle_root", str(BUNDLE), "--output_dir", str(tmp_path), "--max_iterations", "2", "--val_interval", "2",
        "--num_workers", "0", "--roi_size", "64",
    ]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    assert (tmp_path / "demo_data" / "SYNTHETIC_DEMO_DATA").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "synthetic" in (tmp_path / "demo_data" / "README.md").read_text().lower()


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, small_acdc):
    """Real multi-process training (gloo on CPU) through multi_gpu_train.json."""
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    with socket.socket() as probe:  # a free port, so a leftover run elsewhere cannot collide with this one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
        "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(BUNDLE),
        "--output_dir", str(tmp_path), "--dataset_dir", str(small_acdc), "--data_layout", "ssl4mis",
        "--labeled_cases", "1", "--max_iterations", "2", "--val_interval", "2", "--save_interval", "2",
        "--num_workers", "0", "--roi_size", "64", "--batch_size", "2", "--cache_rate", "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "checkpoints" / "checkpoint_iteration=2.pt").is_file()
