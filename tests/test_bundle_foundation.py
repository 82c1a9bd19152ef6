"""The vessa_foundation bundle: train -> evaluate -> infer on the synthetic default and on real ACDC slices (with tiny
Qwen3-VL and SAM2 checkpoints saved in the published formats), workflow properties, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from vessa_components.data import DataError
from vessa_components.metrics import compute_volume_metrics
from vessa_components.networks import VESSA_ENCODER_NAME, Qwen3VLPrompter, build_sam2_model
from vessa_components.templates import TemplateBank

from .helpers import copy_acdc_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_foundation"
CONFIGS = BUNDLE / "configs"
FAST = {"image_size": 64, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False,
        "max_iterations": 2, "val_interval": 2, "save_interval": 2, "sw_batch_size": 16}


@pytest.fixture(scope="module")
def small_acdc(tmp_path_factory, acdc_root) -> Path:
    """Real ACDC slices of two training patients and one real validation volume, in the SSL4MIS layout."""
    return copy_acdc_subset(
        acdc_root, tmp_path_factory.mktemp("acdc_small"), ("patient099", "patient038"), slice_step=3, n_volumes=1
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A tiny Qwen3-VL directory (save_pretrained) and a tiny SAM2 checkpoint in SAM2's own format."""
    root = tmp_path_factory.mktemp("checkpoints")
    Qwen3VLPrompter(train_vlm="frozen").save_pretrained(root / "qwen3vl")
    torch.save({"model": build_sam2_model(preset="tiny_cpu", image_size=64).state_dict()}, root / "sam2.pt")
    return {"vlm_path": str(root / "qwen3vl"), "sam2_ckpt": str(root / "sam2.pt")}


def _workflow(configs, workflow_type, output_dir, **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / c) for c in configs]
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type, bundle_root=str(BUNDLE),
        output_dir=str(output_dir), **{**FAST, **overrides},
    )
    workflow.initialize()
    return workflow


def _infer(bundle_root: Path, inputs: Path, out: Path, **overrides) -> None:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), workflow_type="infer", bundle_root=str(bundle_root),
        dataset_dir=str(inputs), output_dir=str(out), **overrides,
    )
    workflow.initialize()
    assert not workflow.check_properties()
    workflow.run()


def _as_nifti(volume_h5: Path, folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The (z, y, x) h5 volume as a NIfTI in (x, y, z) order, as scanners write them."""
    with h5py.File(volume_h5) as f:
        image, label = f["image"][()], f["label"][()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{volume_h5.stem}.nii.gz"
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), np.diag([1.5, 1.5, 8.0, 1.0])), path)
    return path, image, label


def test_demo_default_train_evaluate_infer(tmp_path):
    out = tmp_path / "run"
    train = _workflow(["train.json"], "train", out)
    assert not train.check_properties()
    train.run()
    train.finalize()
    assert (out / "demo_data" / "SYNTHETIC_DEMO_DATA").is_file()
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    # the tiny random VLM cannot be rebuilt from anywhere else: it is in the weights, as is all of SAM2
    assert any(k.startswith("prompter.vlm.") for k in state) and any(k.startswith("sam2.image_encoder.") for k in state)
    bank = TemplateBank.load(out / "template_bank")
    assert bank.encoder_name != VESSA_ENCODER_NAME and bank.datasets() == ["acdc"]
    assert len({e.patient for e in bank.exemplars}) == 3  # labeled_cases=3: the bank holds the labelled patients
    assert json.loads((out / "validation" / "metrics.json").read_text())["num_volumes"] >= 1

    volume = sorted((out / "prepared_data" / "demo_ssl4mis" / "data").glob("*.h5"))[0]
    _, image, _ = _as_nifti(volume, tmp_path / "inputs")
    _infer(out, tmp_path / "inputs", tmp_path / "pred")
    pred = np.asarray(nib.load(tmp_path / "pred" / f"{volume.stem}_seg.nii.gz").dataobj)
    assert pred.shape == image.transpose(2, 1, 0).shape and set(np.unique(pred)) <= {0, 1, 2, 3}


def test_real_acdc_with_saved_checkpoints_train_evaluate_infer(tmp_path, small_acdc, checkpoints):
    """The loading paths of real Qwen3-VL and SAM2.1 weights, with tiny models saved in their formats."""
    out = tmp_path / "run"
    settings = {"dataset_dir": str(small_acdc), "data_layout": "ssl4mis", "labeled_cases": 2, "sam2_preset": "tiny_cpu",
                **checkpoints}
    train = _workflow(["train.json"], "train", out, **settings)
    network = train.parser.get_parsed_content("network")
    assert not any(p.requires_grad for p in network.sam2.image_encoder.parameters())  # pretrained SAM2 encoder frozen
    train.run()
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("prompter.vlm.") for k in state)  # the frozen VLM stays in its checkpoint directory
    assert "prompter.text_hidden_fcs.2.weight" in state
    bank = TemplateBank.load(out / "template_bank")
    assert bank.encoder_name == VESSA_ENCODER_NAME and bank.embeddings.shape[1] == network.sam2.prompt_embed_dim

    validation = json.loads((out / "validation" / "metrics.json").read_text())

    evaluate = _workflow(["train.json", "evaluate.json"], "eval", out, **settings)
    evaluate.run()
    report = json.loads((out / "eval" / "metrics.json").read_text())
    volume = (small_acdc / "val.list").read_text().split()[0]
    assert set(report["per_volume"]) == {volume}
    # the saved weights and bank reproduce the last validation round of training
    assert report["summary"] == validation["summary"]

    _, image, label = _as_nifti(small_acdc / "data" / f"{volume}.h5", tmp_path / "inputs")
    _infer(out, tmp_path / "inputs", tmp_path / "pred", vlm_path=checkpoints["vlm_path"], sam2_preset="tiny_cpu")
    pred = np.asarray(nib.load(tmp_path / "pred" / f"{volume}_seg.nii.gz").dataobj)
    assert pred.shape == image.transpose(2, 1, 0).shape
    # inference and evaluation run the same VESSA, bank and pixels: the same Dice
    dice = compute_volume_metrics(pred.transpose(2, 1, 0), label, ["bg", "rv", "myo", "lv"])
    for ours, theirs in zip(("rv", "myo", "lv"), ("right_ventricle", "myocardium", "left_ventricle")):
        assert dice[ours]["dice"] == pytest.approx(report["per_volume"][volume][theirs]["dice"], abs=1e-6)


def _error_chain(info) -> list[BaseException]:
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


@pytest.mark.parametrize(
    "override, error, message",
    [
        ({"vlm_path": "EMPTY_DIR"}, DataError, "not a Qwen3-VL checkpoint directory: missing config.json"),
        ({"sam2_ckpt": "OTHER_SAM2"}, ValueError, "does not match the model built from"),
        ({"image_size": 100}, ValueError, "the image side must be a multiple of 32"),
        ({"train_vlm": "partly"}, ValueError, "train_vlm must be one of"),
    ],
)
def test_bad_model_settings(tmp_path, small_acdc, override, error, message):
    (tmp_path / "empty").mkdir()
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1)}}, tmp_path / "other.pt")
    paths = {"EMPTY_DIR": str(tmp_path / "empty"), "OTHER_SAM2": str(tmp_path / "other.pt")}
    override = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in override.items()}
    workflow = _workflow(["train.json"], "train", tmp_path, dataset_dir=str(small_acdc), data_layout="ssl4mis",
                         labeled_cases=1, **override)
    with pytest.raises(Exception) as info:
        workflow.parser.get_parsed_content("network_def")
    assert any(isinstance(e, error) and message in str(e) for e in _error_chain(info)), _error_chain(info)
    if "vlm_path" in override:
        assert str(tmp_path / "empty") in str(info.getrepr())


def test_bank_without_a_class_and_class_unknown_to_the_model(tmp_path, small_acdc):
    # a saved bank whose only other patient never shows the left ventricle
    bank = TemplateBank(64)
    bank.add_dataset("acdc", "MRI", ["background", "right_ventricle", "myocardium", "left_ventricle"])
    for path in sorted((small_acdc / "data" / "slices").glob("patient038_*.h5")):
        with h5py.File(path) as f:
            image, label = f["image"][()], f["label"][()]
        if {1, 2, 3} <= set(np.unique(label).tolist()):
            bank.add(image, np.minimum(label, 2), "acdc", "patient038")
    bank.save(tmp_path / "bank")
    common = {"dataset_dir": str(small_acdc), "data_layout": "ssl4mis", "labeled_cases": 1}
    workflow = _workflow(["train.json"], "train", tmp_path / "run", template_bank=str(tmp_path / "bank"), **common)
    with pytest.raises(Exception) as info:
        workflow.run()
    assert any("no exemplar shows class 'left_ventricle'" in str(e) for e in _error_chain(info)), _error_chain(info)

    # a bank of the same slices whose data set names the third class differently: the model was not built for it
    renamed = TemplateBank(64)
    renamed.add_dataset("acdc", "MRI", ["background", "right_ventricle", "myocardium", "liver"])
    renamed.add(image, label, "acdc", "patient038")
    renamed.save(tmp_path / "renamed_bank")
    workflow = _workflow(["train.json", "evaluate.json"], "eval", tmp_path / "run", **common)
    workflow.parser["template_bank"] = str(tmp_path / "renamed_bank")
    with pytest.raises(Exception) as info:
        workflow.run()
    assert any("classes ['liver'] of data set 'acdc' are not among the model's classes" in str(e)
               for e in _error_chain(info)), _error_chain(info)
