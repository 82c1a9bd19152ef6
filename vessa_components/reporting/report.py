"""The page a user opens after training: learning curves, per-class metrics and overlay figures of one bundle run,
as ``report.md`` and ``report.html`` (with PNG figures) in ``<run_dir>/report``.

It reads what a run of the bundles leaves in its ``output_dir``: TensorBoard events (``logs/``) or, when there are
none, the local MLflow store (``mlruns.db``); the per-volume metrics of the latest validation round
(``validation/metrics.json``) and of ``evaluate.json`` (``eval/metrics.json``); and, for the overlays,
``models/model.pt`` with the bundle config (the ``config_<time>.json`` that ``--tracking`` saves in the run, or a
config file given by the caller).
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..metrics import format_markdown  # noqa: E402
from ..utils.io import atomic_path, write_text  # noqa: E402

__all__ = [
    "load_scalars",
    "load_tensorboard_scalars",
    "load_mlflow_scalars",
    "plot_learning_curves",
    "plot_overlay",
    "predict_volumes",
    "select_slices",
    "make_report",
]

logger = logging.getLogger(__name__)

#: one series: (step, value) pairs sorted by step; steps are trainer iterations
Series = list[tuple[int, float]]

#: label colours (RGB in [0, 1]) of classes 1, 2, 3, ...: matplotlib's tab10 without its grey
_CLASS_COLOURS = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]


def _merge(series: Mapping[str, list[tuple[int, float, float]]]) -> dict[str, Series]:
    """(step, wall time, value) triples -> (step, value) sorted by step, the latest write of a step winning (a resumed
    run repeats the steps after its last checkpoint)."""
    merged = {}
    for tag, points in series.items():
        latest: dict[int, tuple[float, float]] = {}
        for step, wall, value in points:
            if step not in latest or wall >= latest[step][0]:
                latest[step] = (wall, value)
        merged[tag] = [(step, latest[step][1]) for step in sorted(latest)]
    return merged


def load_tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, Series]:
    """Every scalar tag in the TensorBoard event files under ``log_dir`` (all files and sub-folders merged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, list[tuple[int, float, float]]] = {}
    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception as e:  # tensorboard raises several types for a damaged file
            raise ValueError(f"{path}: not a readable TensorBoard event file ({e})") from e
        for tag in accumulator.Tags().get("scalars", []):
            points.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))
    return _merge(points)


def load_mlflow_scalars(tracking_uri: str, run_id: str | None = None) -> tuple[dict[str, Series], str]:
    """Every metric history of an MLflow run: ``run_id``, or the latest run of the store. Returns the series and the
    run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ValueError(f"{tracking_uri}: the MLflow store holds no run")
        run_id = runs[0].info.run_id
    run = client.get_run(run_id)
    points = {
        key: [(m.step, m.timestamp / 1000.0, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    return _merge(points), run_id


def load_scalars(run_dir: str | os.PathLike) -> tuple[dict[str, Series], str]:
    """The learning curves of a run and where they came from: TensorBoard events under ``<run_dir>/logs`` if any,
    else the latest run of the local MLflow store ``<run_dir>/mlruns.db``, else nothing."""
    run_dir = Path(run_dir)
    if any((run_dir / "logs").rglob("events.out.tfevents.*")):
        return load_tensorboard_scalars(run_dir / "logs"), "TensorBoard events in `logs/`"
    store = run_dir / "mlruns.db"
    if store.is_file():
        from monai.utils import path_to_sqlite_uri

        series, run_id = load_mlflow_scalars(path_to_sqlite_uri(str(store.resolve())))
        return series, f"MLflow run `{run_id}` in `mlruns.db`"
    return {}, ""


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def _save(fig: plt.Figure, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return out


def plot_learning_curves(scalars: Mapping[str, Series], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw the training curves (losses with a moving average, then mask ratio and learning rate) and the validation
    curves (mean and per-class Dice, per-class HD95) against the trainer's iteration.

    Args:
        scalars: tag -> (iteration, value); tags starting with ``val_`` are validation metrics, ``lr*`` learning
            rates, the rest training outputs (``loss``, ``loss_x``, ``loss_u``, ``loss_v``, ``mask_ratio`` ...).
        out_dir: folder of ``curves_training.png`` and ``curves_validation.png``.

    Returns:
        figure name (``training``, ``validation``) -> PNG path, for the figures that had data.
    """
    out_dir = Path(out_dir)
    train = {k: v for k, v in scalars.items() if v and not k.startswith("val_")}
    losses = {k: v for k, v in train.items() if k.startswith("loss") or k == "train_loss"}
    others = {k: v for k, v in train.items() if k not in losses}
    figures: dict[str, Path] = {}
    if train:
        fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6, 4), dpi=110, squeeze=False)
        ax = axes[0, 0]
        for i, (tag, series) in enumerate(sorted(losses.items())):
            steps, values = np.array([s for s, _ in series]), np.array([v for _, v in series])
            colour = f"C{i}"
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _moving_average(values, max(1, len(values) // 20)), color=colour, label=tag)
        ax.set(xlabel="iteration", ylabel="loss", title="training losses (line: moving average)")
        ax.grid(alpha=0.3)
        if losses:
            ax.legend()
        if others:
            ax = axes[0, 1]
            for i, (tag, series) in enumerate(sorted(others.items())):
                ax.plot([s for s, _ in series], [v for _, v in series], color=f"C{i + len(losses)}", label=tag)
            ax.set(xlabel="iteration", title="other training outputs")
            ax.grid(alpha=0.3)
            ax.legend()
        figures["training"] = _save(fig, out_dir / "curves_training.png")
    dice = {k: v for k, v in scalars.items() if v and (k.startswith("val_dice_") or k == "val_mean_dice")}
    hd95 = {k: v for k, v in scalars.items() if v and k.startswith("val_hd95_")}
    if dice or hd95:
        fig, axes = plt.subplots(1, 2 if hd95 else 1, figsize=(11 if hd95 else 6, 4), dpi=110, squeeze=False)
        ax = axes[0, 0]
        for tag, series in sorted(dice.items()):
            mean = tag == "val_mean_dice"
            ax.plot(
                [s for s, _ in series], [v for _, v in series], marker="o", markersize=3,
                color="black" if mean else None, linewidth=2 if mean else 1,
                label="mean" if mean else tag.removeprefix("val_dice_"),
            )
        ax.set(xlabel="iteration", ylabel="Dice", ylim=(0, 1), title="validation Dice (per volume, mean over volumes)")
        ax.grid(alpha=0.3)
        ax.legend()
        if hd95:
            ax = axes[0, 1]
            for tag, series in sorted(hd95.items()):
                ax.plot([s for s, _ in series], [v for _, v in series], marker="o", markersize=3,
                        label=tag.removeprefix("val_hd95_"))
            ax.set(xlabel="iteration", ylabel="HD95", title="validation HD95")
            ax.grid(alpha=0.3)
            ax.legend()
        figures["validation"] = _save(fig, out_dir / "curves_validation.png")
    return figures


def select_slices(label: np.ndarray, count: int = 3, axis: int = 0) -> list[int]:
    """Up to ``count`` slice indices along ``axis`` spread evenly over the slices that contain foreground (the middle
    one first when ``count`` is 1); the middle slice when the label is empty."""
    moved = np.moveaxis(label, axis, 0)
    foreground = [k for k in range(moved.shape[0]) if moved[k].any()]
    if not foreground:
        return [moved.shape[0] // 2]
    if count >= len(foreground):
        return foreground
    positions = (np.arange(count) + 0.5) / count * (len(foreground) - 1)  # centres of count equal shares
    return sorted({foreground[int(round(p))] for p in positions})


def _colour_labels(label: np.ndarray) -> np.ndarray:
    """[H, W] label map -> [H, W, 4] RGBA overlay (transparent background)."""
    rgba = np.zeros((*label.shape, 4))
    for value in np.unique(label):
        if value > 0:
            rgba[label == value] = (*_CLASS_COLOURS[(int(value) - 1) % len(_CLASS_COLOURS)], 0.45)
    return rgba


def plot_overlay(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray | Mapping[str, np.ndarray],
    class_names: Sequence[str],
    slices: Sequence[int],
    out: str | os.PathLike,
    title: str = "",
    axis: int = 0,
) -> Path:
    """One row per slice: the image, the image with the ground truth, the image with each prediction.

    Args:
        image, label: volumes of the same shape (intensities; label values ``0..C``).
        pred: the prediction volume, or several by name (one column each, e.g. one per method).
        class_names: names of the label values, background first (for the legend).
        slices: slice indices along ``axis``.
        out: PNG path.
        title: figure title.
        axis: the slice axis.
    """
    preds = dict(pred) if isinstance(pred, Mapping) else {"prediction": pred}
    image, label = (np.moveaxis(np.asarray(a), axis, 0) for a in (image, label))
    preds = {name: np.moveaxis(np.asarray(p), axis, 0) for name, p in preds.items()}
    columns = 2 + len(preds)
    fig, axes = plt.subplots(len(slices), columns, figsize=(3 * columns, 3 * len(slices)), dpi=100, squeeze=False)
    for row, k in enumerate(slices):
        panels = [(None, "image"), (label[k], "ground truth"), *((p[k], name) for name, p in preds.items())]
        for col, (overlay, name) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image[k], cmap="gray")
            if overlay is not None:
                ax.imshow(_colour_labels(overlay))
            ax.set_title(f"slice {k}: {name}", fontsize=9)
            ax.axis("off")
    handles = [
        matplotlib.patches.Patch(color=_CLASS_COLOURS[(i - 1) % len(_CLASS_COLOURS)], label=name)
        for i, name in enumerate(class_names)
        if i > 0
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return _save(fig, Path(out))


def _bundle_parser(config_file: str | os.PathLike | Sequence[str], overrides: Mapping[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=config_file)
    parser.update(pairs=dict(overrides))
    return parser


def predict_volumes(
    run_dir: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str],
    num_volumes: int = 2,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[str], int]:
    """Segment the first ``num_volumes`` validation volumes of a run with its ``models/model.pt``, through the
    bundle's own ``network_def``, ``validate#dataset``, ``validate#inferer`` and ``validate#postprocessing`` (on CPU;
    no handler runs, so nothing in the run is written).

    Returns:
        one ``{"name", "image", "label", "pred"}`` dict of numpy volumes on the label's grid per volume, the class
        names, and the slice axis.
    """
    run_dir = Path(run_dir)
    model_path = run_dir / "models" / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no saved model in the run")
    parser = _bundle_parser(config_file, {"output_dir": str(run_dir), **(overrides or {})})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    network.eval()
    dataset = parser.get_parsed_content("validate#dataset")
    inferer = parser.get_parsed_content("validate#inferer")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    class_names = list(parser.get_parsed_content("class_names"))
    axis = int(parser.get("validate#inferer", {}).get("spatial_dim", 0))
    results = []
    for index in range(min(num_volumes, len(dataset))):
        item = dataset[index]
        with torch.no_grad():
            pred = inferer(item["image"][None].float(), network)[0]
        out = postprocessing({**item, "pred": pred})
        label = out["label"]
        label_map = label.argmax(0) if label.shape[0] > 1 else label[0]
        pred_map = out["pred"].argmax(0) if out["pred"].shape[0] > 1 else out["pred"][0]
        image = torch.nn.functional.interpolate(
            torch.as_tensor(item["image"])[None].float(), size=tuple(label_map.shape), mode="trilinear"
            if label_map.ndim == 3 else "bilinear",
        )[0, 0]
        name = Path(str(item["label"].meta.get("filename_or_obj", f"volume_{index}"))).name.split(".")[0]
        results.append(
            {"name": name, "image": image.numpy(), "label": np.asarray(label_map), "pred": np.asarray(pred_map)}
        )
    return results, class_names, axis


def _read_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        report["summary"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a metrics report written by VolumeMetricsWriter or tools/evaluate.py ({e})"
        ) from e
    return report


def _summary_rows(scalars: Mapping[str, Series], run_dir: Path) -> list[tuple[str, str]]:
    rows = []
    loss = scalars.get("loss") or scalars.get("train_loss")
    if loss:
        last = [v for _, v in loss[-10:]]
        rows.append(("iterations trained", str(loss[-1][0])))
        rows.append(("training loss (mean of the last 10 logged iterations)", f"{np.mean(last):.4f}"))
    dice = scalars.get("val_mean_dice")
    if dice:
        step, best = max(dice, key=lambda p: p[1])
        rows.append(("best validation mean Dice", f"{100 * best:.2f} % at iteration {step}"))
        rows.append(("last validation mean Dice", f"{100 * dice[-1][1]:.2f} % at iteration {dice[-1][0]}"))
    model = run_dir / "models" / "model.pt"
    if model.is_file():
        saved = datetime.datetime.fromtimestamp(model.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        rows.append(("model", f"`models/model.pt` ({model.stat().st_size / 2**20:.1f} MiB, saved {saved})"))
    return rows


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
{body}
</body></html>
"""


def make_report(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    config_file: str | os.PathLike | Sequence[str] | None = None,
    num_volumes: int = 2,
    slices_per_volume: int = 3,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` with their figures for the bundle run in ``run_dir``.

    Args:
        run_dir: the run's ``output_dir``.
        out_dir: where the report goes (default ``<run_dir>/report``).
        config_file: the bundle config(s) for the overlay figures; default: the config ``--tracking`` saved in the run
            (``config_<time>.json``). Without either, the report has no overlays and says how to get them.
        num_volumes: validation volumes shown in the overlays.
        slices_per_volume: slices per volume in the overlays.
        overrides: config ids to set for the overlays, e.g. ``{"dataset_dir": ...}`` when the data moved.

    Returns:
        ``{"markdown": ..., "html": ..., <figure name>: PNG path ...}``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: ``run_dir`` holds no training output at all, or a metrics file is damaged (named).
    """
    from ..handlers.tracking import executed_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    scalars, source = load_scalars(run_dir)
    evaluation = _read_metrics(run_dir / "eval" / "metrics.json")
    validation = _read_metrics(run_dir / "validation" / "metrics.json")
    if not scalars and evaluation is None and validation is None:
        raise ValueError(
            f"{run_dir}: no training output found (expected TensorBoard events in logs/, an MLflow store mlruns.db, "
            "validation/metrics.json or eval/metrics.json); is this a bundle's output_dir?"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_learning_curves(scalars, out_dir)

    lines = [f"# Training report: `{run_dir.resolve().name}`", ""]
    lines.append(f"Run folder `{run_dir}`, report written {datetime.datetime.now():%Y-%m-%d %H:%M}.")
    if source:
        lines.append(f"Learning curves from {source}.")
    lines.append("")
    rows = _summary_rows(scalars, run_dir)
    if rows:
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += ["## Learning curves", ""]
    if figures:
        for name, path in figures.items():
            lines += [f"![{name} curves]({path.name})", ""]
    else:
        lines += ["No learning curves: the run has no TensorBoard events and no MLflow store.", ""]

    lines += ["## Per-class metrics", ""]
    for heading, report in (
        ("Evaluation (`evaluate.json`, `eval/metrics.json`)", evaluation),
        ("Latest validation round (`validation/metrics.json`)", validation),
    ):
        if report is not None:
            lines += [f"### {heading}", "", format_markdown(report).strip(), ""]
    if evaluation is None and validation is None:
        lines += ["No per-volume metrics in the run (no validation round finished).", ""]

    lines += ["## Overlays", ""]
    config = config_file if config_file is not None else executed_config(run_dir)
    if config is None:
        lines += [
            "No overlays: the run has no saved config. Pass the bundle's config and data, e.g. "
            "`--config_file bundles/vessa_ssl_acdc/configs/train.json --dataset_dir ... --data_layout ...`, "
            "or train with `--tracking`, which saves it in the run.",
            "",
        ]
    else:
        try:
            volumes, class_names, axis = predict_volumes(run_dir, config, num_volumes, overrides)
        except Exception as e:  # the report is still worth having without its overlays
            logger.warning(f"overlays skipped: {e}")
            lines += [f"No overlays: {type(e).__name__}: {e}", ""]
        else:
            lines += [
                f"Image, ground truth and prediction of `models/model.pt` on {len(volumes)} validation volume(s), "
                f"slices spread over the labelled part of each volume (colours: "
                + ", ".join(f"{i}: {n}" for i, n in enumerate(class_names) if i > 0) + ").",
                "",
            ]
            for volume in volumes:
                slices = select_slices(volume["label"], slices_per_volume, axis)
                dice = ""
                if validation is not None and volume["name"] in validation.get("per_volume", {}):
                    per_class = validation["per_volume"][volume["name"]]
                    dice = " (validation Dice " + ", ".join(
                        f"{c} {100 * m['dice']:.1f} %" for c, m in per_class.items() if "dice" in m
                    ) + ")"
                path = plot_overlay(
                    volume["image"], volume["label"], volume["pred"], class_names, slices,
                    out_dir / f"overlay_{volume['name']}.png", title=volume["name"], axis=axis,
                )
                figures[f"overlay_{volume['name']}"] = path
                lines += [f"### {volume['name']}{dice}", "", f"![overlay {volume['name']}]({path.name})", ""]

    text = "\n".join(lines).rstrip() + "\n"
    import markdown

    body = markdown.markdown(text, extensions=["tables"])
    page = _HTML.format(title=html.escape(f"Training report: {run_dir.resolve().name}"), body=body)
    return {
        "markdown": write_text(out_dir / "report.md", text),
        "html": write_text(out_dir / "report.html", page),
        **figures,
    }
