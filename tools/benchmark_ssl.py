"""Train Stage-2 methods through the vessa_ssl_acdc bundle with identical budgets, for one or more numbers of labelled
cases and seeds, and compare them; VESSA methods get their Stage-1 model from a ``vessa_foundation`` run trained here on
the same labelled cases.

The VESSA ablation of the issue (one command; on a CPU the budget is reduced and the output says so; on a GPU the same
command runs the full budget)::

    python tools/benchmark_ssl.py --dataset_dir ../shared/data/acdc_ssl4mis --labeled_cases 1,3 --seeds 0,1,2 \\
        --methods supervised,unimatch_v2,vessa,vessa_no_feedback,vessa_no_vlm --out_dir runs/ablation

Methods: the bundle's ``supervised`` and ``unimatch_v2``; ``vessa`` (VESSA pseudo-labels with the teacher's feedback),
``vessa_no_feedback`` (feedback never starts) and ``vessa_no_vlm`` (a foundation run with ``train_vlm=off``: a learned
class embedding instead of the Qwen3-VL ``<SEG>`` prompt). ``--vessa_ckpt`` / ``--vessa_no_vlm_ckpt`` use existing
foundation weights instead of training them (one labelled-cases setting only: a Stage-2 template bank may hold only
the run's labelled cases, and the weights must have been trained on the same ones).

Any bundle id can be set for every run with ``--overrides``, e.g. UniMatch V2 as published::

    python tools/benchmark_ssl.py ... --methods unimatch_v2 --overrides '{"unlabeled_loss": "ce", "pseudo_labels_from": "teacher"}'

Writes to ``out_dir``: ``results.json`` (rewritten after every run: a crashed benchmark resumes where it stopped when
run again with the same settings), ``results.md`` (per labelled-cases setting: per-class Dice, Jaccard, HD95, ASD as
mean ± std over seeds, costs, VESSA alone, VESSA's pseudo-label quality on the unlabelled pool, VESSA's cost against
unimatch_v2), ``dice_vs_labeled_cases.png``, and per setting ``l{N}/dice_vs_iterations.png``,
``l{N}/overlays.png`` (a validation volume's slices: image, ground truth, every method) and
``l{N}/pseudo_label_quality.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from tqdm import tqdm

from vessa_components.reporting import (
    plot_dice_curves,
    plot_dice_vs_labeled_cases,
    plot_overlay,
    plot_pseudo_label_quality,
    predict_volumes,
    sample_std,
    select_slices,
)
from vessa_components.reporting.benchmark import (
    BUNDLE,
    format_results,
    measure_overhead,
    run_foundation,
    run_method,
    summarize_runs,
)
from vessa_components.utils import show_progress, write_json, write_text

VESSA_METHODS = ("vessa", "vessa_no_feedback", "vessa_no_vlm")
METHODS = ("supervised", "unimatch_v2", *VESSA_METHODS)

#: Settings of each budget; explicit arguments win. ``full`` is what a GPU runs. ``reduced`` is the CPU budget: the
#: 5-method x 2-setting x 3-seed ablation takes about 4 hours on two cores (36 minutes per setting and seed, 17 for the
#: four foundations). Half the iterations would fit two hours, but at 200 iterations every method's EMA teacher still
#: scored 0 validation Dice on ACDC (measured), so the comparison would say nothing.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": {
        "max_iterations": 6000, "val_interval": 500, "roi_size": 256, "batch_size": 8,
        "foundation_iterations": 3000, "vessa_refresh_interval": 200, "pool_quality_interval": 500,
    },
    "reduced": {
        "max_iterations": 400, "val_interval": 200, "roi_size": 96, "batch_size": 4,
        "foundation_iterations": 400, "vessa_refresh_interval": 100, "pool_quality_interval": 100,
    },
}


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
    raise ValueError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")


def resolve_budget(budget: str, explicit: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The budget's name (``auto``: ``full`` with a GPU, ``reduced`` without) and its settings, explicit values
    (those not ``None``) winning."""
    if budget == "auto":
        budget = "full" if torch.cuda.is_available() else "reduced"
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget '{budget}'; choose auto, {', '.join(BUDGETS)}")
    return budget, {**BUDGETS[budget], **{k: v for k, v in explicit.items() if v is not None}}


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]


def _mean_dice(run: dict[str, Any]) -> float:
    return float(run["summary"]["mean"]["dice"]["mean"])


def format_vessa_tables(
    foundations: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """Markdown lines: VESSA alone (Stage 1, on val.list), VESSA's pseudo-label quality on the unlabelled pool against
    the teacher's (first and last measurement, mean over seeds), and VESSA's training speed against unimatch_v2."""
    lines: list[str] = []
    if foundations:
        lines += ["**VESSA alone** (Stage 1 on the labelled cases, val.list, %)", "",
                  "| foundation run | mean Dice | iterations | wall time (min) |", "|---|---:|---:|---:|"]
        for name, f in foundations.items():
            lines.append(f"| {name} | {100 * _mean_dice(f):.2f} | {f['iterations']} | {f['wall_s'] / 60:.1f} |")
        lines.append("")
    pool_rows = []
    for method, method_runs in runs.items():
        records = [r["pool_quality"] for r in method_runs if r.get("pool_quality")]
        if not records:
            continue
        first = lambda key: np.mean([100 * rec[0][key]["mean_dice"] for rec in records])  # noqa: E731
        last = lambda key: np.mean([100 * rec[-1][key]["mean_dice"] for rec in records])  # noqa: E731
        kept = np.mean([100 * rec[-1]["vessa"]["kept_share"] for rec in records])
        pool_rows.append(
            f"| {method} | {first('vessa'):.2f} -> {last('vessa'):.2f} | {first('teacher'):.2f} -> {last('teacher'):.2f} "
            f"| {kept:.1f} |"
        )
    if pool_rows:
        lines += ["**Pseudo-label quality on the unlabelled pool** (mean Dice %, first -> last measurement, mean over "
                  "seeds; kept = share of pixels VESSA is confident on at the end)", "",
                  "| method | VESSA | EMA teacher | kept (%) |", "|---|---:|---:|---:|", *pool_rows, ""]
    if "unimatch_v2" in runs:
        # median over seeds: one run that shared the CPU with something else does not move the ratio
        speed = {m: float(np.median([r["samples_per_s"] for r in runs[m]])) for m in runs}
        base = speed["unimatch_v2"]
        rows = [f"| {m} | {speed[m]:.2f} | {speed[m] / base:.2f} |" for m in runs if m in VESSA_METHODS]
        if rows:
            lines += ["**VESSA's cost in the loop** (samples/s: each run's median over its iterations, then the median "
                      "over seeds; target >= 0.5 of unimatch_v2)",
                      "", "| method | samples/s | / unimatch_v2 |", "|---|---:|---:|",
                      f"| unimatch_v2 | {base:.2f} | 1.00 |", *rows, ""]
    return lines


#: (better, worse) pairs the paired-difference table reports, in the issue's target order first
COMPARISONS = (
    ("vessa", "unimatch_v2"), ("unimatch_v2", "supervised"), ("vessa", "supervised"),
    ("vessa", "vessa_no_feedback"), ("vessa", "vessa_no_vlm"),
)


def format_comparisons(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown lines: for each pair of :data:`COMPARISONS` that ``runs`` holds, the difference in mean Dice (points)
    paired by seed (mean ± sample std over the seeds both methods ran), how many seeds the first method wins, and
    whether the mean difference exceeds the seed-to-seed spread (the larger sample std of the two methods' Dice)."""
    rows = []
    for better, worse in COMPARISONS:
        if better not in runs or worse not in runs:
            continue
        dice = {m: {r["seed"]: 100 * _mean_dice(r) for r in runs[m]} for m in (better, worse)}
        seeds = sorted(set(dice[better]) & set(dice[worse]))
        if not seeds:
            continue
        diffs = np.array([dice[better][s] - dice[worse][s] for s in seeds])
        spread = max(sample_std(list(dice[m].values())) for m in (better, worse))
        std = sample_std(diffs)
        verdict = "n/a (one seed)" if len(seeds) < 2 else ("yes" if abs(diffs.mean()) > spread else "no")
        rows.append(f"| {better} - {worse} | {len(seeds)} | {diffs.mean():+.2f} ± {std:.2f} | "
                    f"{int((diffs > 0).sum())}/{len(seeds)} | {spread:.2f} | {verdict} |")
    if not rows:
        return []
    return ["**Paired differences in mean Dice** (points, per seed: first method - second; mean ± sample std over "
            "seeds; spread = the larger sample std of the two methods' Dice over seeds)", "",
            "| comparison | seeds | difference | first wins | spread | exceeds spread |",
            "|---|---:|---:|---:|---:|---|", *rows, ""]


def mean_pool_quality(runs_records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The mean over runs (seeds) of VESSA's and the teacher's pool mean Dice, at the iterations every run measured."""
    iterations = sorted(set.intersection(*({rec["iteration"] for rec in records} for records in runs_records)))
    by_iteration = [{rec["iteration"]: rec for rec in records} for records in runs_records]
    return [
        {"iteration": it, **{
            source: {"mean_dice": float(np.mean([runs[it][source]["mean_dice"] for runs in by_iteration]))}
            for source in ("vessa", "teacher")
        }}
        for it in iterations
    ]


def write_overlays(setting_dir: Path, runs: dict[str, list[dict]], common: dict[str, Any], labeled_cases: str) -> None:
    """Image, ground truth and every method's prediction (seed of the first run) on slices of one validation volume."""
    preds, volume, class_names, axis = {}, None, None, 0
    for method, method_runs in runs.items():
        run_dir = setting_dir / f"{method}_seed{method_runs[0]['seed']}"
        overrides = {k: common[k] for k in ("dataset_dir", "data_layout", "roi_size") if k in common}
        volumes, class_names, axis = predict_volumes(
            run_dir, str(BUNDLE / "configs" / "train.json"), num_volumes=1,
            overrides={**overrides, "labeled_cases": int(labeled_cases), "seed": method_runs[0]["seed"]},
        )
        volume = volumes[0]
        preds[method] = volume["pred"]
    if volume is None:
        return
    slices = select_slices(volume["label"], count=3, axis=axis)
    plot_overlay(
        volume["image"], volume["label"], preds, class_names, slices, setting_dir / "overlays.png",
        title=f"{volume['name']}, labeled_cases={labeled_cases}", axis=axis,
    )


def main(
    dataset_dir: str,
    labeled_cases: str | int = 3,
    methods: str = "supervised,unimatch_v2",
    seeds: str = "0",
    out_dir: str = "runs/benchmark_ssl",
    budget: str = "auto",
    max_iterations: int | None = None,
    val_interval: int | None = None,
    roi_size: int | None = None,
    batch_size: int | None = None,
    foundation_iterations: int | None = None,
    data_layout: str = "ssl4mis",
    num_workers: int = 1,
    threads: int = 2,
    overhead_iterations: int = 0,
    vessa_ckpt: str = "",
    vessa_no_vlm_ckpt: str = "",
    vessa_train_vlm: str = "frozen",
    vessa_sam2_preset: str = "small_cpu",
    vessa_image_size: int = 128,
    feedback_prompt_prob: float = 0.5,
    overrides: dict | None = None,
    report_only: bool = False,
) -> None:
    """Train every method for every labelled-cases setting and seed (and the foundation runs the VESSA methods need),
    then write the tables and figures.

    ``budget``: ``auto`` (``full`` with a GPU, ``reduced`` without), ``full`` or ``reduced`` (see :data:`BUDGETS`);
    ``max_iterations``, ``val_interval``, ``roi_size``, ``batch_size`` and ``foundation_iterations`` override it.
    ``overrides``: further bundle ids for every Stage-2 run, e.g. ``--overrides '{"conf_thresh": 0.9}'``.
    ``feedback_prompt_prob``: the foundations' share of iterations with simulated feedback prompts.
    Runs in ``results.json`` made with other settings are trained again: every run when the Stage-2 settings changed,
    the foundations and the VESSA methods' runs when the foundation settings changed.
    ``overhead_iterations`` > 0 also measures the trainer against a bare PyTorch loop.
    ``report_only``: train nothing; write the tables and figures of the runs ``results.json`` already holds.
    """
    out = Path(out_dir)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--overrides must be a dict of bundle ids, got {overrides!r}")
    budget, settings = resolve_budget(
        budget, {"max_iterations": max_iterations, "val_interval": val_interval, "roi_size": roi_size,
                 "batch_size": batch_size, "foundation_iterations": foundation_iterations},
    )
    method_list, seed_list, case_list = _as_list(methods), [int(s) for s in _as_list(seeds)], _as_list(labeled_cases)
    for m in method_list:  # fail before hours of training, not after
        method_overrides(m, {}, "")
    needs_vessa = [m for m in method_list if m in VESSA_METHODS]
    if (vessa_ckpt or vessa_no_vlm_ckpt) and len(case_list) > 1:
        raise ValueError("--vessa_ckpt / --vessa_no_vlm_ckpt were trained on one set of labelled cases; "
                         "benchmark one --labeled_cases setting with them, or let the benchmark train the foundations")
    common = {
        "dataset_dir": dataset_dir, "data_layout": data_layout, "max_iterations": settings["max_iterations"],
        "val_interval": settings["val_interval"], "save_interval": settings["max_iterations"],
        "roi_size": settings["roi_size"], "batch_size": settings["batch_size"], "num_workers": num_workers,
        "show_progress": False, "vessa_refresh_interval": settings["vessa_refresh_interval"],
        "pool_quality_interval": settings["pool_quality_interval"], **(overrides or {}),
    }
    banner = (
        f"budget: {budget}{' (reduced: no GPU; pass --budget full for the full one)' if budget == 'reduced' else ''}: "
        f"{settings['max_iterations']} iterations, roi {settings['roi_size']}, batch {settings['batch_size']} "
        f"(+{settings['batch_size']} unlabelled)"
        + (f", foundation {settings['foundation_iterations']} iterations" if needs_vessa else "")
    )
    print(banner)
    foundation_settings = {
        "foundation_iterations": settings["foundation_iterations"], "vessa_train_vlm": vessa_train_vlm,
        "vessa_sam2_preset": vessa_sam2_preset, "vessa_image_size": vessa_image_size, "dataset_dir": dataset_dir,
        "feedback_prompt_prob": feedback_prompt_prob,
    }
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    same_runs = previous.get("settings", {}).get("common") == common
    same_foundations = previous.get("settings", {}).get("foundation") == foundation_settings
    results: dict[str, Any] = {
        "settings": {"budget": budget, "common": common, "foundation": foundation_settings, **settings}, "setting": {}
    }
    # resume what was trained with the same settings; settings not asked for this time are kept, not dropped
    for n in dict.fromkeys([*previous.get("setting", {}), *case_list]):
        before = previous.get("setting", {}).get(n, {})
        runs = before.get("runs", {}) if same_runs else {}
        if not same_foundations:  # the VESSA methods' runs used the old foundations
            runs = {m: r for m, r in runs.items() if m not in VESSA_METHODS}
        results["setting"][n] = {"foundations": before.get("foundations", {}) if same_foundations else {}, "runs": runs}
    write_json(out / "results.json", results)

    jobs = [("foundation", n, name, 0) for n in case_list for name in _foundation_names(needs_vessa, vessa_ckpt, vessa_no_vlm_ckpt)]
    # seed by seed: an interrupted benchmark has whole seeds to report (--report_only)
    jobs += [("stage2", n, m, s) for s in seed_list for n in case_list for m in method_list]
    if report_only:
        jobs = []
    for kind, n, name, seed in tqdm(jobs, desc="training runs", disable=not show_progress()):
        state = results["setting"][n]
        setting_dir = out / f"l{n}"
        if kind == "foundation":
            if name in state["foundations"]:
                continue
            state["foundations"][name] = run_foundation(
                setting_dir / name, threads=threads, seed=0, dataset_dir=dataset_dir, data_layout=data_layout,
                labeled_cases=int(n), max_iterations=settings["foundation_iterations"],
                val_interval=settings["foundation_iterations"], save_interval=settings["foundation_iterations"],
                sam2_preset=vessa_sam2_preset, image_size=vessa_image_size, num_workers=num_workers,
                train_vlm="off" if name == "foundation_no_vlm" else vessa_train_vlm, show_progress=False,
                feedback_prompt_prob=feedback_prompt_prob,
            )
        else:
            if any(r["seed"] == seed for r in state["runs"].get(name, [])):
                continue
            vessa = {
                "vessa_ckpt": vessa_ckpt or state["foundations"].get("foundation", {}).get("checkpoint", ""),
                "vessa_train_vlm": vessa_train_vlm, "vessa_sam2_preset": vessa_sam2_preset,
                "vessa_image_size": vessa_image_size,
            }
            no_vlm = vessa_no_vlm_ckpt or state["foundations"].get("foundation_no_vlm", {}).get("checkpoint", "")
            result = run_method(
                setting_dir / f"{name}_seed{seed}", threads=threads, seed=seed, labeled_cases=int(n), **common,
                **method_overrides(name, vessa, no_vlm),
            )
            state["runs"].setdefault(name, []).append({"seed": seed, **result})
        write_json(out / "results.json", results)  # partial results survive a crash, and the next call resumes

    overhead = None
    if overhead_iterations > 0:
        overhead = measure_overhead(
            out / "overhead", iterations=overhead_iterations, threads=threads,
            **{**common, "labeled_cases": int(case_list[-1]), "method": "unimatch_v2", "cache_rate": 1.0},
        )
    report = [banner, ""]
    dice_by_cases: dict[int, dict[str, list[float]]] = {}
    for n in case_list:
        state, setting_dir = results["setting"][n], out / f"l{n}"
        runs = {m: state["runs"][m] for m in method_list if state["runs"].get(m)}
        if not runs:
            continue
        summary = {m: summarize_runs(rs) for m, rs in runs.items()}
        state["summary"] = summary
        note = (f"### labeled_cases={n}\n\n{dataset_dir}, seeds {', '.join(map(str, seed_list))}; evaluation per 3D "
                f"volume of val.list with each run's best EMA teacher")
        report.append(format_results(summary, overhead if n == case_list[-1] else None, note))
        report += format_comparisons(runs)
        report += format_vessa_tables(state["foundations"], runs)
        dice_by_cases[int(n)] = {m: [_mean_dice(r) for r in rs] for m, rs in runs.items()}
        plot_dice_curves({m: [r["curve"] for r in rs] for m, rs in runs.items()}, setting_dir / "dice_vs_iterations.png",
                         title=f"labeled_cases={n}")
        pool = {}
        for m, rs in runs.items():
            records = [r["pool_quality"] for r in rs if r.get("pool_quality")]
            if records:
                pool[f"{m} ({len(records)} seeds)"] = mean_pool_quality(records)
        if pool:
            plot_pseudo_label_quality(pool, setting_dir / "pseudo_label_quality.png", title=f"labeled_cases={n}")
        write_overlays(setting_dir, runs, common, n)
    plot_dice_vs_labeled_cases(dice_by_cases, out / "dice_vs_labeled_cases.png", title=f"{budget} budget")
    results["overhead"] = overhead
    write_json(out / "results.json", results)
    table = "\n".join(report)
    write_text(out / "results.md", table)
    print(table)
    print(json.dumps({n: {m: round(100 * float(np.mean(v)), 2) for m, v in d.items()} for n, d in dice_by_cases.items()}))


def _foundation_names(needs_vessa: list[str], vessa_ckpt: str, vessa_no_vlm_ckpt: str) -> list[str]:
    names = []
    if any(m in ("vessa", "vessa_no_feedback") for m in needs_vessa) and not vessa_ckpt:
        names.append("foundation")
    if "vessa_no_vlm" in needs_vessa and not vessa_no_vlm_ckpt:
        names.append("foundation_no_vlm")
    return names


if __name__ == "__main__":
    fire.Fire(main)
