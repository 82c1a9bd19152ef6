"""The Stage-2 benchmark / VESSA ablation tool: budgets, tables, figures, and one small end-to-end run on real ACDC."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vessa_components.reporting import plot_dice_vs_labeled_cases, plot_overlay, plot_pseudo_label_quality

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_ssl.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("benchmark_ssl", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_is_reduced_without_a_gpu_and_explicit_values_win(tool, monkeypatch):
    monkeypatch.setattr(tool.torch.cuda, "is_available", lambda: False)
    name, settings = tool.resolve_budget("auto", {"max_iterations": 7, "roi_size": None})
    assert name == "reduced"
    assert settings["max_iterations"] == 7
    assert settings["roi_size"] == tool.BUDGETS["reduced"]["roi_size"]
    monkeypatch.setattr(tool.torch.cuda, "is_available", lambda: True)
    assert tool.resolve_budget("auto", {})[0] == "full"
    with pytest.raises(ValueError, match="unknown budget"):
        tool.resolve_budget("huge", {})


def test_method_overrides_of_the_ablation(tool):
    vessa = {"vessa_ckpt": "a.pt", "vessa_train_vlm": "frozen"}
    assert tool.method_overrides("vessa_no_feedback", vessa, "b.pt")["feedback_start"] > 10**6
    no_vlm = tool.method_overrides("vessa_no_vlm", vessa, "b.pt")
    assert (no_vlm["vessa_ckpt"], no_vlm["vessa_train_vlm"]) == ("b.pt", "off")
    with pytest.raises(ValueError, match="unknown method 'mean_teacher'"):
        tool.method_overrides("mean_teacher", vessa, "")


def _run(samples_per_s: float, vessa_dice: list[float] | None = None) -> dict:
    pool = None
    if vessa_dice:
        pool = [
            {"iteration": 10 * (i + 1), "vessa": {"mean_dice": d, "kept_share": 0.5}, "teacher": {"mean_dice": 0.1}}
            for i, d in enumerate(vessa_dice)
        ]
    return {"samples_per_s": samples_per_s, "pool_quality": pool}


def test_vessa_tables_report_cost_ratio_and_pool_quality(tool):
    runs = {"unimatch_v2": [_run(4.0), _run(0.5), _run(4.2)], "vessa": [_run(2.0, [0.2, 0.4]), _run(1.0, [0.0, 0.2])]}
    foundations = {"foundation": {"summary": {"mean": {"dice": {"mean": 0.125}}}, "iterations": 5, "wall_s": 60.0}}
    text = "\n".join(tool.format_vessa_tables(foundations, runs))
    assert "| foundation | 12.50 | 5 | 1.0 |" in text
    # medians over seeds: 1.5 against 4.0, so the 0.5 of a run that shared the CPU does not count
    assert "| vessa | 1.50 | 0.38 |" in text
    assert "| vessa | 10.00 -> 30.00 | 10.00 -> 10.00 | 50.0 |" in text


def _scored(seed: int, dice: float) -> dict:
    return {"seed": seed, "summary": {"mean": {"dice": {"mean": dice}}}}


def test_paired_differences_say_whether_the_gap_exceeds_the_seed_spread(tool):
    runs = {
        "supervised": [_scored(0, 0.10), _scored(1, 0.20), _scored(2, 0.30)],
        "unimatch_v2": [_scored(0, 0.12), _scored(1, 0.18), _scored(2, 0.33)],
        "vessa": [_scored(2, 0.80), _scored(0, 0.60)],  # seed order differs and seed 1 is missing: paired by seed
    }
    text = "\n".join(tool.format_comparisons(runs))
    # vessa - unimatch_v2 on seeds 0 and 2: 48 and 47 points; spread = the larger sample std, vessa's 14.14
    assert "| vessa - unimatch_v2 | 2 | +47.50 ± 0.71 | 2/2 | 14.14 | yes |" in text
    # unimatch_v2 - supervised: +2, -2, +3 points, within unimatch_v2's spread of 10.82
    assert "| unimatch_v2 - supervised | 3 | +1.00 ± 2.65 | 2/3 | 10.82 | no |" in text
    assert "vessa_no_vlm" not in text  # pairs without both methods are left out
    assert tool.format_comparisons({"vessa": [_scored(0, 0.5)]}) == []


def test_pool_quality_is_averaged_over_seeds_at_common_iterations(tool):
    seed0 = [{"iteration": i, "vessa": {"mean_dice": d}, "teacher": {"mean_dice": 0.0}} for i, d in ((100, 0.4), (200, 0.6))]
    seed1 = [{"iteration": 100, "vessa": {"mean_dice": 0.2}, "teacher": {"mean_dice": 0.3}}]  # stopped early
    mean = tool.mean_pool_quality([seed0, seed1])
    assert [r["iteration"] for r in mean] == [100]
    assert mean[0]["vessa"]["mean_dice"] == pytest.approx(0.3)
    assert mean[0]["teacher"]["mean_dice"] == pytest.approx(0.15)


def test_figures(tmp_path):
    out = plot_dice_vs_labeled_cases({1: {"a": [0.1, 0.2]}, 3: {"a": [0.4], "b": [0.5]}}, tmp_path / "cases.png")
    assert Image.open(out).size[0] > 100
    records = [{"iteration": 1, "vessa": {"mean_dice": 0.1}, "teacher": {"mean_dice": 0.2}}]
    assert plot_pseudo_label_quality({"vessa seed 0": records}, tmp_path / "pool.png").is_file()
    volume = np.zeros((2, 8, 8))
    one = plot_overlay(volume, volume, volume, ["bg", "x"], [0], tmp_path / "one.png")
    three = plot_overlay(volume, volume, {"a": volume, "b": volume, "c": volume}, ["bg", "x"], [0], tmp_path / "three.png")
    assert Image.open(three).size[0] > 1.5 * Image.open(one).size[0]  # one column per method


def test_ablation_end_to_end_and_resume(tmp_path, acdc_root, tool):
    from .helpers import copy_acdc_subset

    data = copy_acdc_subset(acdc_root, tmp_path / "acdc", ("patient099", "patient038"), slice_step=4, n_volumes=1)
    out = tmp_path / "ablation"
    kwargs = dict(
        dataset_dir=str(data), labeled_cases="1", methods="supervised,vessa_no_vlm", seeds="0", out_dir=str(out),
        budget="reduced", max_iterations=2, val_interval=2, roi_size=64, batch_size=2, foundation_iterations=2,
        num_workers=0, vessa_sam2_preset="tiny_cpu", vessa_image_size=64,
        overrides={"pool_quality_interval": 1, "pool_quality_slices": 4, "vessa_refresh_interval": 1},
    )
    tool.main(**kwargs)
    results = json.loads((out / "results.json").read_text())
    setting = results["setting"]["1"]
    assert set(setting["foundations"]) == {"foundation_no_vlm"}
    assert [r["iterations"] for r in setting["runs"]["vessa_no_vlm"]] == [2]
    pool = setting["runs"]["vessa_no_vlm"][0]["pool_quality"]
    assert [r["iteration"] for r in pool][:2] == [1, 2]
    assert 0.0 <= pool[-1]["vessa"]["mean_dice"] <= 1.0
    assert setting["runs"]["supervised"][0]["pool_quality"] is None
    for figure in ("dice_vs_labeled_cases.png", "l1/overlays.png", "l1/pseudo_label_quality.png", "l1/dice_vs_iterations.png"):
        assert (out / figure).is_file(), figure
    text = (out / "results.md").read_text()
    assert "budget: reduced" in text and "VESSA alone" in text and "/ unimatch_v2" not in text
    # a second call with the same settings trains nothing again
    model = out / "l1" / "supervised_seed0" / "models" / "model.pt"
    stamp = model.stat().st_mtime_ns
    tool.main(**kwargs)
    assert model.stat().st_mtime_ns == stamp
    # asking for another setting keeps the runs of this one in results.json
    tool.main(**{**kwargs, "labeled_cases": "2", "report_only": True})
    assert json.loads((out / "results.json").read_text())["setting"]["1"]["runs"] == setting["runs"]
    # other foundation settings: the foundations and the VESSA methods' runs are stale, the supervised run is not
    tool.main(**{**kwargs, "feedback_prompt_prob": 0.0, "report_only": True})
    stale = json.loads((out / "results.json").read_text())["setting"]["1"]
    assert stale["foundations"] == {} and stale["runs"] == {"supervised": setting["runs"]["supervised"]}
