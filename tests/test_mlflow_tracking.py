"""MLflow tracking of the vessa_ssl_acdc bundle against the real tools: a real `mlflow server` on 127.0.0.1 (SQLite
backend), the local SQLite store, and the fallback to it when the server does not answer. Runs read back with
`mlflow.MlflowClient`; TensorBoard events read back with TensorBoard's own reader."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import path_to_sqlite_uri

from vessa_components.handlers import hyperparameters, scalar_outputs, tracking_server_error
from vessa_components.reporting import load_tensorboard_scalars, make_report

from .helpers import copy_acdc_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "vessa_ssl_acdc"
CONFIGS = BUNDLE / "configs"
SETTINGS = CONFIGS / "mlflow_tracking.json"
ITERATIONS, VAL_INTERVAL = 4, 2
RUN = {
    "roi_size": 64, "batch_size": 2, "num_workers": 0, "cache_rate": 0.0, "show_progress": False,
    "data_layout": "ssl4mis", "labeled_cases": 1, "max_iterations": ITERATIONS, "val_interval": VAL_INTERVAL,
    "save_interval": ITERATIONS,
}
CLASSES = ("right_ventricle", "myocardium", "left_ventricle")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def mlflow_server_process(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied artifacts in a temporary folder), started when the module
    starts so that it comes up while the local-store tests run; stopped with its whole process group."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", path_to_sqlite_uri(str(root / "mlflow.db")),
        "--artifacts-destination", str(root / "artifacts"),
    ]
    # job execution would start seven task-queue workers: nothing here needs them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield {"process": process, "uri": f"http://127.0.0.1:{port}", "log": root / "server.log"}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_process) -> str:
    """The server's URI once it answers on /health."""
    uri, process = mlflow_server_process["uri"], mlflow_server_process["process"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = mlflow_server_process["log"].read_text()[-2000:]
            pytest.fail(f"mlflow server exited ({process.returncode}): {log}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer within 240 s: {mlflow_server_process['log'].read_text()[-2000:]}")


@pytest.fixture(scope="module")
def small_acdc(tmp_path_factory, acdc_root) -> Path:
    return copy_acdc_subset(
        acdc_root, tmp_path_factory.mktemp("acdc_mlflow"), ("patient099", "patient038", "patient050"),
        slice_step=2, n_volumes=1,
    )


def _train(out: Path, data: Path, tracking: str, **overrides) -> None:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", bundle_root=str(BUNDLE), output_dir=str(out),
        dataset_dir=str(data), tracking=tracking, **{**RUN, **overrides},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def _only_run(client: mlflow.MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _assert_complete_run(client: mlflow.MlflowClient, out: Path, tmp_path: Path) -> None:
    """Everything the settings promise is in the run: parameters, every iteration's losses, per-class validation
    metrics at the trainer's iteration, and models/model.pt equal to the one on disk."""
    run = _only_run(client, "vessa_ssl_acdc")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.01" and params["max_iterations"] == str(ITERATIONS)
    assert params["roi_size"] == "64" and params["method"] == "unimatch_v2" and params["output_dir"] == str(out)
    run_id = run.info.run_id
    for key in ("loss", "loss_x", "loss_u", "mask_ratio"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, ITERATIONS + 1)), key
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    loss_x = {m.step: m.value for m in client.get_metric_history(run_id, "loss_x")}
    loss_u = {m.step: m.value for m in client.get_metric_history(run_id, "loss_u")}
    assert all(loss[s] == pytest.approx((loss_x[s] + loss_u[s]) / 2, rel=1e-5) for s in loss)  # UniMatch V2's total
    validation_steps = list(range(VAL_INTERVAL, ITERATIONS + 1, VAL_INTERVAL))
    for cls in CLASSES:
        for metric in ("dice", "hd95"):
            history = client.get_metric_history(run_id, f"val_{metric}_{cls}")
            assert sorted(m.step for m in history) == validation_steps, (metric, cls)
    # the last round's per-class Dice is the one the run's validation report holds
    import json

    report = json.loads((out / "validation" / "metrics.json").read_text())
    last_dice = {m.step: m.value for m in client.get_metric_history(run_id, "val_dice_myocardium")}[ITERATIONS]
    assert last_dice == pytest.approx(report["summary"]["myocardium"]["dice"]["mean"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "metrics.json"} <= artifacts and any(a.startswith("config_") for a in artifacts), artifacts
    local = client.download_artifacts(run_id, "model.pt", str(tmp_path))
    logged = torch.load(local, map_location="cpu", weights_only=True)
    saved = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert logged.keys() == saved.keys() and all(torch.equal(logged[k], saved[k]) for k in saved)


def test_scalar_outputs_and_hyperparameters():
    out = {"loss": torch.tensor(0.5), "loss_x": torch.tensor(1.0), "pred": torch.zeros(2, 4, 8, 8), "mask_ratio": 0.25}
    assert scalar_outputs(out) == {"loss": 0.5, "loss_x": 1.0, "mask_ratio": 0.25}
    assert scalar_outputs([out, out]) == scalar_outputs(out)  # a decollated output is read from its first item
    config = {"imports": ["$import torch"], "lr": 0.01, "name": "unet", "ref": "@lr", "expr": "$1 + 1",
              "classes": ["bg", "lv"], "net": {"_target_": "UNet"}, "finalize": [], "_meta_": {"version": "1"}}
    assert hyperparameters(config) == {"lr": 0.01, "name": "unet", "classes": ["bg", "lv"]}


def test_default_store_is_local(tmp_path):
    """Without --tracking_uri the settings name <output_dir>/mlruns.db (artifacts go to <output_dir>/mlruns)."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", bundle_root=str(BUNDLE),
        output_dir=str(tmp_path), tracking=str(SETTINGS),
    )
    assert workflow.parser.get_parsed_content("tracking_uri") == path_to_sqlite_uri(str(tmp_path / "mlruns.db"))
    assert workflow.parser.get_parsed_content("experiment_name") == "vessa_ssl_acdc"


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory, small_acdc) -> tuple[Path, list]:
    """A run whose --tracking_uri names a server that does not answer; returns its folder and the warnings."""
    nowhere = f"http://127.0.0.1:{_free_port()}"
    assert tracking_server_error(nowhere) is not None
    out = tmp_path_factory.mktemp("fallback") / "run"
    with pytest.warns(UserWarning, match=f"MLflow tracking server {nowhere} is unreachable") as record:
        _train(out, small_acdc, str(SETTINGS), tracking_uri=nowhere)
    return out, [str(w.message) for w in record]


def test_unreachable_server_falls_back_to_local_store(tmp_path, fallback_run):
    """A server that does not answer: a warning naming it at the start, then the whole run in the local store
    <output_dir>/mlruns.db; the TensorBoard events of the same run hold the per-class validation metrics at the same
    iterations."""
    out, messages = fallback_run
    assert any(str(out / "mlruns.db") in m for m in messages), messages
    assert list((out / "mlruns").rglob("model.pt"))  # artifacts beside the SQLite store
    _assert_complete_run(mlflow.MlflowClient(path_to_sqlite_uri(str(out / "mlruns.db"))), out, tmp_path / "dl")

    scalars = load_tensorboard_scalars(out / "logs")
    assert [s for s, _ in scalars["loss_x"]] == list(range(1, ITERATIONS + 1))
    for cls in CLASSES:
        assert [s for s, _ in scalars[f"val_dice_{cls}"]] == list(range(VAL_INTERVAL, ITERATIONS + 1, VAL_INTERVAL))


def test_report_from_mlflow_store(tmp_path, fallback_run):
    """A run without TensorBoard events: the report reads its curves from the local MLflow store, and its overlays
    from the config that --tracking saved in the run."""
    out, _ = fallback_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("logs", "checkpoints"))
    paths = make_report(run, num_volumes=1, slices_per_volume=2)
    text = paths["markdown"].read_text()
    assert "Learning curves from MLflow run" in text
    assert f"| iterations trained | {ITERATIONS} |" in text
    assert {"training", "validation", "overlay_patient028_frame01"} <= set(paths)
    assert plt.imread(paths["overlay_patient028_frame01"]).shape[0] > 400  # two slice rows


def test_monai_default_tracking_mlflow(tmp_path, small_acdc):
    """`--tracking mlflow` (MONAI's own settings): the training loss per iteration and the per-class validation
    metrics in <output_dir>/mlruns.db."""
    out = tmp_path / "run"
    _train(out, small_acdc, "mlflow")
    client = mlflow.MlflowClient(path_to_sqlite_uri(str(out / "mlruns.db")))
    run = _only_run(client, "monai_experiment")
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == ITERATIONS
    assert {f"val_dice_{c}" for c in CLASSES} <= set(run.data.metrics)


def test_tracking_server(tmp_path, small_acdc, mlflow_server):
    """--tracking_uri of a real server: everything lands there (read back over HTTP), nothing in a local store."""
    out = tmp_path / "run"
    assert tracking_server_error(mlflow_server) is None
    _train(out, small_acdc, str(SETTINGS), tracking_uri=mlflow_server)
    assert not (out / "mlruns.db").exists()
    _assert_complete_run(mlflow.MlflowClient(mlflow_server), out, tmp_path / "dl")
