"""tools/report.py on the outputs of a real short vessa_ssl_acdc run (training + evaluate.json) on real ACDC data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fire
import matplotlib.pyplot as plt
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from vessa_components.metrics import compute_volume_metrics
from vessa_components.reporting import load_tensorboard_scalars, make_report, predict_volumes, select_slices

from .helpers import copy_acdc_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_ssl_acdc"
CONFIGS = BUNDLE / "configs"
SETTINGS = {
    "roi_size": 64, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False,
    "data_layout": "ssl4mis", "labeled_cases": 1, "max_iterations": 4, "val_interval": 2, "save_interval": 4,
}
CLASSES = ["background", "right_ventricle", "myocardium", "left_ventricle"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, acdc_root) -> tuple[Path, Path]:
    """A short training run and its evaluation, without --tracking (so no config is saved in the run)."""
    data = copy_acdc_subset(
        acdc_root, tmp_path_factory.mktemp("acdc_report"), ("patient099", "patient038", "patient050"),
        slice_step=2, n_volumes=2,
    )
    out = tmp_path_factory.mktemp("report") / "run"
    for configs, kind in ((["train.json"], "train"), (["train.json", "evaluate.json"], "eval")):
        files = [str(CONFIGS / c) for c in configs]
        workflow = ConfigWorkflow(
            config_file=files if len(files) > 1 else files[0], workflow_type=kind, bundle_root=str(BUNDLE),
            output_dir=str(out), dataset_dir=str(data), **SETTINGS,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    return out, data


def _report_tool():
    spec = importlib.util.spec_from_file_location("report_tool", REPO_ROOT / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_of_a_run(finished_run, capsys):
    run, data = finished_run
    # the command line: the run kept no config, so the user names the bundle's and its data
    fire.Fire(
        _report_tool().main,
        command=[str(run), "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(data),
                 "--data_layout", "ssl4mis", "--roi_size", "64", "--slices_per_volume", "2"],
    )
    report_dir = run / "report"
    assert str(report_dir / "report.html") in capsys.readouterr().out
    text = (report_dir / "report.md").read_text()

    # summary from the TensorBoard events, validation at the trainer's iterations
    scalars = load_tensorboard_scalars(run / "logs")
    best_step, best = max(scalars["val_mean_dice"], key=lambda p: p[1])
    assert [s for s, _ in scalars["val_mean_dice"]] == [2, 4]
    assert f"| best validation mean Dice | {100 * best:.2f} % at iteration {best_step} |" in text
    assert "| iterations trained | 4 |" in text

    # the per-class tables are the run's evaluation and latest validation reports
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())
    for cls in CLASSES[1:]:
        dice = evaluation["summary"][cls]["dice"]
        assert f"| {cls} | {100 * dice['mean']:.2f} ± {100 * dice['std']:.2f} |" in text
    assert text.index("### Evaluation") < text.index("### Latest validation round")

    # figures: curves and one overlay per validation volume, all referenced by both pages
    html = (report_dir / "report.html").read_text()
    assert "<table>" in html
    volumes = (data / "val.list").read_text().split()
    for name in ["curves_training.png", "curves_validation.png", *(f"overlay_{v}.png" for v in volumes)]:
        assert plt.imread(report_dir / name).ndim == 3, name
        assert f"]({name})" in text and f'src="{name}"' in html


def test_overlay_predictions_are_the_evaluated_ones(finished_run):
    """The overlays' predictions come from models/model.pt through the bundle's validation pipeline: their Dice per
    volume is the one evaluate.json reported for the same model."""
    run, data = finished_run
    volumes, class_names, axis = predict_volumes(
        run, str(CONFIGS / "train.json"), num_volumes=2,
        overrides={"dataset_dir": str(data), "data_layout": "ssl4mis", "roi_size": 64},
    )
    assert class_names == CLASSES and axis == 0
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())["per_volume"]
    for volume in volumes:
        assert volume["image"].shape == volume["label"].shape == volume["pred"].shape
        ours = compute_volume_metrics(volume["pred"], volume["label"], CLASSES)
        for cls in CLASSES[1:]:
            assert ours[cls]["dice"] == pytest.approx(evaluation[volume["name"]][cls]["dice"], abs=1e-6)


def test_select_slices():
    label = np.zeros((10, 4, 4), dtype=np.uint8)
    label[2:9, 1, 1] = 1  # foreground on slices 2..8
    assert select_slices(label, 3) == [3, 5, 7]
    assert select_slices(label, 20) == list(range(2, 9))
    assert select_slices(np.zeros((6, 4, 4)), 3) == [3]
    assert select_slices(np.moveaxis(label, 0, 2), 1, axis=2) == [5]


def test_bad_run_dirs(tmp_path, finished_run):
    with pytest.raises(FileNotFoundError, match="nowhere: run directory does not exist"):
        make_report(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no training output found"):
        make_report(tmp_path)
    run, _ = finished_run
    broken = tmp_path / "broken"
    (broken / "validation").mkdir(parents=True)
    (broken / "validation" / "metrics.json").write_text('{"per_volume": ')
    with pytest.raises(ValueError, match=r"broken/validation/metrics.json: not a metrics report"):
        make_report(broken)
    # a run without a saved config still gets its curves and tables, and is told how to get overlays
    paths = make_report(run, out_dir=tmp_path / "plain")
    assert "No overlays: the run has no saved config" in paths["markdown"].read_text()
