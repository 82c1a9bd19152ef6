"""Benchmark of Stage-2 methods through the bundle: identical budgets, per-volume metrics, throughput, memory, and the
trainer's overhead against a bare PyTorch loop over the same network, batch and augmentations."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from queue import Empty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..engines import UniMatchV2Trainer, frozen_batchnorm_stats, pseudo_label_loss
from ..transforms.ssl import cutmix_with_flipped_batch
from .figures import sample_std

__all__ = [
    "bare_unimatch_v2_step",
    "format_results",
    "measure_overhead",
    "run_foundation",
    "run_method",
    "summarize_runs",
]

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "vessa_ssl_acdc"
FOUNDATION_BUNDLE = BUNDLE.parent / "vessa_foundation"


def _workflow(
    output_dir: str | os.PathLike,
    config_files: Sequence[str] = ("train.json",),
    bundle: Path = BUNDLE,
    **overrides: Any,
):
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / f) for f in config_files]
    workflow = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        workflow_type="train",
        bundle_root=str(bundle),
        output_dir=str(output_dir),
        **overrides,
    )
    workflow.initialize()
    return workflow


def _in_process(target, output_dir: str | os.PathLike, overrides: dict[str, Any], *args: Any) -> dict[str, Any]:
    """Run ``target(output_dir, overrides, *args, queue)`` in a spawned process (so its peak memory is its own) and
    return what it puts in the queue; a crashed child raises here instead of leaving the parent waiting."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(str(output_dir), overrides, *args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5.0)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__} in {output_dir} died with exit code {process.exitcode}") from None
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{target.__name__} in {output_dir} failed with exit code {process.exitcode}")
    return result


def _peak_rss_gb() -> float:
    """Peak resident memory of this process plus its finished children (data-loading workers), in GB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024**2


def _train_and_evaluate(output_dir: str, overrides: dict[str, Any], queue: mp.Queue) -> None:
    from ignite.engine import Events

    torch.set_num_threads(int(overrides.pop("threads")))
    workflow = _workflow(output_dir, **overrides)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    stamps: list[float] = []
    curve: list[tuple[int, float]] = []
    validation_time = [0.0]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    evaluator.add_event_handler(Events.STARTED, lambda e: validation_time.append(-time.perf_counter()))
    evaluator.add_event_handler(Events.COMPLETED, lambda e: validation_time.append(time.perf_counter()))
    evaluator.add_event_handler(
        Events.COMPLETED, lambda e: curve.append((trainer.state.iteration, float(e.state.metrics["val_mean_dice"])))
    )
    start = time.perf_counter()
    workflow.run()
    wall = time.perf_counter() - start
    workflow.finalize()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    evaluate = _workflow(output_dir, ("train.json", "evaluate.json"), **overrides)
    evaluate.run()
    import json

    report = json.loads((Path(output_dir) / "eval" / "metrics.json").read_text())
    labeled_bs = int(workflow.parser.get_parsed_content("batch_size"))
    has_unlabeled = workflow.parser.get_parsed_content("train#trainer").unlabeled_data_loader is not None
    samples_per_iteration = labeled_bs * (2 if has_unlabeled else 1)
    pool = Path(output_dir) / "vessa_pool_quality.json"
    queue.put(
        {
            "iterations": trainer.state.iteration,
            "wall_s": wall,
            "train_s": wall - sum(validation_time),
            "median_iteration_s": statistics.median(steps) if steps else float("nan"),
            "samples_per_s": samples_per_iteration / statistics.median(steps) if steps else float("nan"),
            "peak_rss_gb": _peak_rss_gb(),
            "curve": curve,
            "summary": report["summary"],
            "pool_quality": json.loads(pool.read_text()) if pool.is_file() else None,
        }
    )


def run_method(output_dir: str | os.PathLike, threads: int = 2, **overrides: Any) -> dict[str, Any]:
    """Train and evaluate one configuration of the ``vessa_ssl_acdc`` bundle in a fresh process."""
    return _in_process(_train_and_evaluate, output_dir, {**overrides, "threads": threads})


def _train_foundation(output_dir: str, overrides: dict[str, Any], queue: mp.Queue) -> None:
    import json

    torch.set_num_threads(int(overrides.pop("threads")))
    workflow = _workflow(output_dir, bundle=FOUNDATION_BUNDLE, **overrides)
    start = time.perf_counter()
    workflow.run()
    wall = time.perf_counter() - start
    iterations = workflow.parser.get_parsed_content("train#trainer").state.iteration
    workflow.finalize()
    report = json.loads((Path(output_dir) / "validation" / "metrics.json").read_text())
    queue.put(
        {
            "checkpoint": str(Path(output_dir) / "models" / "model.pt"),
            "iterations": iterations,
            "wall_s": wall,
            "peak_rss_gb": _peak_rss_gb(),
            "summary": report["summary"],
        }
    )


def run_foundation(output_dir: str | os.PathLike, threads: int = 2, **overrides: Any) -> dict[str, Any]:
    """Train the ``vessa_foundation`` bundle (Stage 1) in a fresh process; its last validation round is VESSA alone
    on ``val.list``.

    Returns:
        ``checkpoint`` (the run's ``models/model.pt``), ``iterations``, ``wall_s``, ``peak_rss_gb`` and the
        per-class ``summary`` of the validation metrics.
    """
    return _in_process(_train_foundation, output_dir, {**overrides, "threads": threads})


def bare_unimatch_v2_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_function: Any,
    labeled: dict[str, torch.Tensor],
    unlabeled: dict[str, torch.Tensor],
    conf_thresh: float,
    ema_decay: float,
    iteration: int,
    teacher_bn_stats: str = "ema",
    unlabeled_loss: str = "ce",
    pseudo_labels_from: str = "teacher",
) -> float:
    """One UniMatch V2 step written as a plain PyTorch loop body: the reference the trainer's overhead is measured
    against (same network, batches and augmentations; no Ignite, no handlers). ``teacher_bn_stats``,
    ``unlabeled_loss`` and ``pseudo_labels_from`` as in :class:`~vessa_components.engines.UniMatchV2Trainer`."""
    x, y = labeled["image"], labeled["label"]
    with torch.no_grad():
        teacher.train(teacher_bn_stats == "own")
        if pseudo_labels_from == "teacher" or teacher_bn_stats == "own":
            conf_w, pseudo_w = teacher(unlabeled["image"]).softmax(dim=1).max(dim=1)
        if pseudo_labels_from == "student":
            conf_w, pseudo_w = student.train()(unlabeled["image"]).softmax(dim=1).max(dim=1)
    box1, box2 = unlabeled["cutmix_box1"], unlabeled["cutmix_box2"]
    strong = torch.cat(
        (cutmix_with_flipped_batch(unlabeled["image_s1"], box1), cutmix_with_flipped_batch(unlabeled["image_s2"], box2))
    )
    student.train()
    optimizer.zero_grad()
    loss_x = loss_function(student(x), y)
    with frozen_batchnorm_stats(student):
        pred_s1, pred_s2 = student(strong, comp_drop=True).chunk(2)
    loss_u = 0.0
    for pred, box in ((pred_s1, box1), (pred_s2, box2)):
        pseudo, keep = cutmix_with_flipped_batch(pseudo_w, box), cutmix_with_flipped_batch(conf_w, box) >= conf_thresh
        loss_u = loss_u + pseudo_label_loss(pred, pseudo, keep, unlabeled_loss) / 2
    loss = (loss_x + loss_u) / 2
    loss.backward()
    optimizer.step()
    ratio = min(1 - 1 / (iteration + 1), ema_decay)
    with torch.no_grad():
        for p_t, p_s in zip(teacher.parameters(), student.parameters()):
            p_t.mul_(ratio).add_(p_s, alpha=1 - ratio)
        for b_t, b_s in zip(teacher.buffers() if teacher_bn_stats == "ema" else (), student.buffers()):
            b_t.copy_(b_t * ratio + b_s * (1 - ratio) if b_t.is_floating_point() else b_s)
    return loss.item()


def _overhead(output_dir: str, overrides: dict[str, Any], iterations: int, queue: mp.Queue) -> None:
    from ignite.engine import Events

    torch.set_num_threads(int(overrides.pop("threads")))
    workflow = _workflow(output_dir, **{**overrides, "max_iterations": 10**6, "val_interval": 10**6})
    parser = workflow.parser
    trainer: UniMatchV2Trainer = parser.get_parsed_content("train#trainer")
    labeled_loader = parser.get_parsed_content("train#dataloader")
    unlabeled_loader = parser.get_parsed_content("train#unlabeled_dataloader")
    student, teacher = parser.get_parsed_content("network"), parser.get_parsed_content("teacher")
    optimizer, loss_function = parser.get_parsed_content("optimizer"), parser.get_parsed_content("loss")
    conf_thresh, ema_decay = parser.get_parsed_content("conf_thresh"), parser.get_parsed_content("ema_decay")
    teacher_bn_stats = parser.get_parsed_content("teacher_bn_stats")
    unlabeled_loss = parser.get_parsed_content("unlabeled_loss")
    pseudo_labels_from = parser.get_parsed_content("pseudo_labels_from")

    def bare(n: int) -> list[float]:
        stamps = []
        labeled_iter, unlabeled_iter = iter(_cycle(labeled_loader)), iter(_cycle(unlabeled_loader))
        for i in range(n):
            bare_unimatch_v2_step(
                student, teacher, optimizer, loss_function, next(labeled_iter), next(unlabeled_iter),
                conf_thresh, ema_decay, i, teacher_bn_stats, unlabeled_loss, pseudo_labels_from,
            )
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def bundle_trainer(n: int) -> list[float]:
        stamps: list[float] = []
        handle = trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=trainer.state.iteration + n), lambda e: e.terminate())
        trainer.run()
        handle.remove()
        return [b - a for a, b in zip(stamps, stamps[1:])]

    half = max(2, iterations // 2)
    bare_steps = bare(half)
    trainer_steps = bundle_trainer(iterations)
    bare_steps += bare(half)
    batch = int(parser.get_parsed_content("batch_size")) * 2
    bare_rate = batch / statistics.median(bare_steps)
    trainer_rate = batch / statistics.median(trainer_steps)
    queue.put({"bare_samples_per_s": bare_rate, "trainer_samples_per_s": trainer_rate, "ratio": trainer_rate / bare_rate})


def _cycle(loader):
    while True:
        yield from loader


def measure_overhead(output_dir: str | os.PathLike, iterations: int = 30, threads: int = 2, **overrides: Any) -> dict:
    """Samples/s of the bundle's trainer and of :func:`bare_unimatch_v2_step` over the same loaders and networks,
    measured in one process (bare, trainer, bare again, to cancel drift); the ratio is trainer / bare."""
    return _in_process(_overhead, output_dir, {**overrides, "threads": threads}, iterations)


def summarize_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one run) over seeds of every metric in the runs' evaluation
    summaries and of their costs."""
    import numpy as np

    out: dict[str, Any] = {"seeds": len(runs), "metrics": {}}
    rows = runs[0]["summary"].keys()
    for row in rows:
        out["metrics"][row] = {}
        for metric in ("dice", "jaccard", "hd95", "asd"):
            values = [r["summary"][row][metric]["mean"] for r in runs]
            out["metrics"][row][metric] = {"mean": float(np.mean(values)), "std": sample_std(values)}
    for key in ("iterations", "wall_s", "samples_per_s", "peak_rss_gb"):
        values = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(values)), "std": sample_std(values)}
    return out


def format_results(summary: dict[str, dict[str, Any]], overhead: dict[str, float] | None, note: str = "") -> str:
    """Markdown tables: per method, per class and mean Dice / Jaccard (%), HD95 / ASD (voxels), and costs."""
    lines = []
    if note:
        lines += [note, ""]
    methods = list(summary)
    classes = [c for c in next(iter(summary.values()))["metrics"] if c != "mean"] + ["mean"]
    for metric, scale, unit in (("dice", 100, "%"), ("jaccard", 100, "%"), ("hd95", 1, "voxels"), ("asd", 1, "voxels")):
        lines.append(f"**{metric.upper() if metric.startswith('hd') or metric == 'asd' else metric.capitalize()}** ({unit}, mean ± sample std over seeds)")
        lines.append("")
        lines.append("| method | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---:|" * len(classes))
        for m in methods:
            cells = []
            for c in classes:
                v = summary[m]["metrics"][c][metric]
                cells.append(f"{scale * v['mean']:.2f} ± {scale * v['std']:.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| method | seeds | iterations | wall time (min) | samples/s | peak RSS (GB) |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        s = summary[m]
        lines.append(
            f"| {m} | {s['seeds']} | {s['iterations']['mean']:.0f} | {s['wall_s']['mean'] / 60:.1f} ± {s['wall_s']['std'] / 60:.1f} "
            f"| {s['samples_per_s']['mean']:.2f} ± {s['samples_per_s']['std']:.2f} | {s['peak_rss_gb']['mean']:.2f} |"
        )
    if overhead:
        lines += [
            "",
            "| trainer overhead (same process, same loaders) | samples/s |",
            "|---|---:|",
            f"| bare PyTorch loop | {overhead['bare_samples_per_s']:.2f} |",
            f"| UniMatchV2Trainer (bundle) | {overhead['trainer_samples_per_s']:.2f} |",
            f"| ratio trainer / bare | {overhead['ratio']:.3f} |",
        ]
    return "\n".join(lines) + "\n"
