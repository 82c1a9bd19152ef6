"""Train Stage-2 methods through the vessa_ssl_acdc bundle with identical budgets and compare them.

Example (what the issue's note reports; a GPU user raises --max_iterations)::

    python tools/benchmark_ssl.py --dataset_dir ../shared/data/acdc_ssl4mis --labeled_cases 3 \
        --methods supervised,unimatch_v2 --max_iterations 600 --seeds 0,1,2 --out_dir runs/benchmark_ssl

VESSA methods need a ``vessa_foundation`` run's weights: ``vessa`` and ``vessa_no_feedback`` (feedback never starts)
use ``--vessa_ckpt`` (trained with ``--vessa_train_vlm``), ``vessa_no_vlm`` uses ``--vessa_no_vlm_ckpt`` (a foundation
run with ``train_vlm=off``)::

    python tools/benchmark_ssl.py ... --methods supervised,unimatch_v2,vessa,vessa_no_feedback,vessa_no_vlm \
        --vessa_ckpt runs/foundation/models/model.pt --vessa_no_vlm_ckpt runs/foundation_no_vlm/models/model.pt

``--overrides`` sets further bundle ids for every run, e.g. UniMatch V2 as published::

    python tools/benchmark_ssl.py ... --methods unimatch_v2 --overrides '{"unlabeled_loss": "ce", "pseudo_labels_from": "teacher"}'

Writes ``results.json``, ``results.md`` (per-class Dice, Jaccard, HD95, ASD as mean ± std over seeds, iterations, wall
time, samples/s, peak memory, the trainer-vs-bare-loop throughput) and ``dice_vs_iterations.png`` to ``out_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
from tqdm import tqdm

from vessa_components.reporting import plot_dice_curves
from vessa_components.reporting.benchmark import format_results, measure_overhead, run_method, summarize_runs
from vessa_components.utils import show_progress, write_json, write_text


def method_overrides(method: str, vessa: dict, vessa_no_vlm_ckpt: str) -> dict:
    """Bundle overrides of a benchmark method name (the bundle's own methods, or a VESSA ablation)."""
    if method in ("supervised", "unimatch_v2"):
        return {"method": method}
    if method == "vessa":
        return {"method": "vessa", **vessa}
    if method == "vessa_no_feedback":
        return {"method": "vessa", **vessa, "feedback_start": 10**9}
    if method == "vessa_no_vlm":
        return {"method": "vessa", **vessa, "vessa_ckpt": vessa_no_vlm_ckpt, "vessa_train_vlm": "off"}
    raise ValueError(
        f"unknown method '{method}'; choose from supervised, unimatch_v2, vessa, vessa_no_feedback, vessa_no_vlm"
    )


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]


def main(
    dataset_dir: str,
    labeled_cases: str | int = 3,
    methods: str = "supervised,unimatch_v2",
    max_iterations: int = 600,
    val_interval: int = 100,
    seeds: str = "0",
    out_dir: str = "runs/benchmark_ssl",
    data_layout: str = "ssl4mis",
    roi_size: int = 128,
    batch_size: int = 4,
    num_workers: int = 1,
    threads: int = 2,
    overhead_iterations: int = 30,
    vessa_ckpt: str = "",
    vessa_no_vlm_ckpt: str = "",
    vessa_train_vlm: str = "frozen",
    vessa_image_size: int = 128,
    overrides: dict | None = None,
) -> None:
    """Run every method for every seed, then the overhead measurement, and write the tables and the figure.

    ``overrides``: further bundle ids for every run, e.g. ``--overrides '{"unlabeled_loss": "ce", "conf_thresh": 0.9}'``.
    """
    out = Path(out_dir)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--overrides must be a dict of bundle ids, got {overrides!r}")
    common = {
        "dataset_dir": dataset_dir, "data_layout": data_layout, "labeled_cases": labeled_cases,
        "max_iterations": max_iterations, "val_interval": val_interval, "save_interval": max_iterations,
        "roi_size": roi_size, "batch_size": batch_size, "num_workers": num_workers, "show_progress": False,
        **(overrides or {}),
    }
    vessa = {"vessa_ckpt": vessa_ckpt, "vessa_train_vlm": vessa_train_vlm, "vessa_image_size": vessa_image_size}
    for m in _as_list(methods):  # fail before hours of training, not after
        method_overrides(m, vessa, vessa_no_vlm_ckpt)
    runs: dict[str, list[dict]] = {}
    jobs = [(m, int(s)) for m in _as_list(methods) for s in _as_list(seeds)]
    for method, seed in tqdm(jobs, desc="training runs", disable=not show_progress()):
        overrides = method_overrides(method, vessa, vessa_no_vlm_ckpt)
        result = run_method(out / f"{method}_seed{seed}", threads=threads, seed=seed, **common, **overrides)
        runs.setdefault(method, []).append({"seed": seed, **result})
        write_json(out / "results.json", {"settings": common, "runs": runs})  # partial results survive a crash
    overhead = None
    if overhead_iterations > 0:
        overhead = measure_overhead(
            out / "overhead", iterations=overhead_iterations, threads=threads,
            **{**common, "method": "unimatch_v2", "cache_rate": 1.0},
        )
    summary = {method: summarize_runs(method_runs) for method, method_runs in runs.items()}
    note = (
        f"{dataset_dir}, labeled_cases={labeled_cases}, {max_iterations} iterations, batch {batch_size} (+{batch_size} "
        f"unlabelled), roi {roi_size}, seeds {', '.join(_as_list(seeds))}; evaluation per 3D volume of val.list"
    )
    write_json(out / "results.json", {"settings": common, "runs": runs, "summary": summary, "overhead": overhead})
    table = format_results(summary, overhead, note)
    write_text(out / "results.md", table)
    plot_dice_curves(
        {m: [r["curve"] for r in rs] for m, rs in runs.items()}, out / "dice_vs_iterations.png",
        title=f"labeled_cases={labeled_cases}",
    )
    print(table)
    print(json.dumps({m: round(100 * s["metrics"]["mean"]["dice"]["mean"], 2) for m, s in summary.items()}))


if __name__ == "__main__":
    fire.Fire(main)
