"""MLflow experiment tracking for the bundles: MONAI's ``MLFlowHandler`` with a fallback to a local store when the
tracking server cannot be reached, and the helpers the bundles' ``configs/mlflow_tracking.json`` settings use.

Use through MONAI's own switch, with the settings file shipped in each bundle::

    python -m monai.bundle run --config_file bundles/vessa_ssl_acdc/configs/train.json \\
        --tracking bundles/vessa_ssl_acdc/configs/mlflow_tracking.json [--tracking_uri http://127.0.0.1:5000]
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri

__all__ = [
    "MLFlowTracker",
    "executed_config",
    "hyperparameters",
    "local_tracking_uri",
    "new_run_name",
    "resolve_tracking_uri",
    "scalar_outputs",
    "tracking_server_error",
]

#: the local store of a run: a SQLite database in ``output_dir``, artifacts in ``output_dir/mlruns`` (MONAI's default)
LOCAL_STORE_NAME = "mlruns.db"


def local_tracking_uri(output_dir: str | os.PathLike) -> str:
    """The SQLite URI of the local MLflow store of a run, ``<output_dir>/mlruns.db`` (artifacts go next to it, under
    ``<output_dir>/mlruns``), as MONAI's ``DEFAULT_MLFLOW_SETTINGS`` use it."""
    return path_to_sqlite_uri(os.path.join(os.path.abspath(output_dir), LOCAL_STORE_NAME))


def new_run_name() -> str:
    """A run name made from the current time (MONAI's format), fixed once per parsed config so that the trainer's and
    the validator's handlers join the same run, and a run that crashed (left ``RUNNING``) is never continued."""
    return time.strftime("run_%Y%m%d_%H%M%S")


def tracking_server_error(tracking_uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow server at an ``http(s)`` ``tracking_uri`` cannot be reached, or ``None`` when it answers (any
    HTTP status counts as an answer: a server behind a proxy may refuse ``/health`` and still accept runs) or when the
    URI is not an HTTP one (SQLite and other stores are opened by MLflow itself).

    Args:
        tracking_uri: the tracking URI.
        timeout: seconds to wait for the server's answer.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason


def resolve_tracking_uri(tracking_uri: str | None, fallback_uri: str, timeout: float = 5.0) -> str:
    """The tracking URI a run should log to: ``$MLFLOW_TRACKING_URI`` if set (it wins over the argument, as in
    ``MLFlowHandler``), else ``tracking_uri``, else ``fallback_uri``; an HTTP server that does not answer is replaced
    by ``fallback_uri`` with a warning, so that training starts and every metric is kept locally.

    Args:
        tracking_uri: the URI given to the bundle (``--tracking_uri``); empty or ``None`` for the local store.
        fallback_uri: the local store, e.g. :func:`local_tracking_uri` of the run's ``output_dir``.
        timeout: seconds to wait for the server's answer.
    """
    requested = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or fallback_uri
    error = tracking_server_error(requested, timeout=timeout)
    if error is None:
        return requested
    warnings.warn(
        f"MLflow tracking server {requested} is unreachable ({error}); this run logs to the local store "
        f"{fallback_uri} instead (open it with `mlflow ui --backend-store-uri {fallback_uri}`).",
        UserWarning,
        stacklevel=2,
    )
    return fallback_uri


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


class MLFlowTracker(MLFlowHandler):
    """``monai.handlers.MLFlowHandler`` that checks the tracking server when it is built (at the start of a bundle
    run) and, when the server does not answer, warns and logs to ``fallback_uri`` (a local SQLite store) instead, so a
    run never stops or loses metrics because of the tracking server.

    Args:
        tracking_uri: the requested tracking URI (``$MLFLOW_TRACKING_URI`` wins, as in ``MLFlowHandler``); empty or
            ``None`` for ``fallback_uri``.
        fallback_uri: the local store used when the server is unreachable or no URI is given.
        reachability_timeout: seconds to wait for the server's answer.
        kwargs: the other arguments of ``MLFlowHandler`` (``experiment_name``, ``run_name``, ``output_transform``,
            ``experiment_param``, ``artifacts``, ``close_on_complete`` ...).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        fallback_uri: str | None = None,
        reachability_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        fallback = fallback_uri or local_tracking_uri(os.getcwd())
        self.tracking_uri = resolve_tracking_uri(tracking_uri, fallback, timeout=reachability_timeout)
        env = os.environ.get("MLFLOW_TRACKING_URI")
        # MLFlowHandler prefers $MLFLOW_TRACKING_URI over its argument: hide it when it named the unreachable server
        with _without_env("MLFLOW_TRACKING_URI") if env and env != self.tracking_uri else contextlib.nullcontext():
            super().__init__(tracking_uri=self.tracking_uri, **kwargs)


def scalar_outputs(output: Any) -> dict[str, float]:
    """The scalar entries of a trainer's iteration output (``loss``, ``loss_x``, ``loss_u``, ``loss_v``,
    ``mask_ratio`` ... whatever the trainer reports), as floats, for per-iteration logging; images, labels and
    predictions are left out. A decollated output (a list of dicts) is read from its first item."""
    if isinstance(output, (list, tuple)):
        output = output[0] if output else {}
    if not isinstance(output, Mapping):
        return {}
    scalars = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.ndim <= 1:
            scalars[str(key)] = float(value.detach().float().item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[str(key)] = float(value)
    return scalars


def executed_config(output_dir: str | os.PathLike) -> str | None:
    """The newest ``config_<time>.json`` in ``output_dir``: the merged config (files + command-line overrides) that
    MONAI's ``--tracking`` writes at the start of a run (``save_execute_config``), or ``None`` when there is none."""
    configs = sorted(Path(output_dir).glob("config_*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    return str(configs[-1]) if configs else None


def _is_hyperparameter(key: str, value: Any) -> bool:
    if key.startswith("_") or key in ("imports", "save_execute_config"):
        return False
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_hyperparameter(key, v) and not isinstance(v, (list, tuple)) for v in value)
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))  # expressions and references are derived, not set
    return isinstance(value, (int, float, bool)) or value is None


def hyperparameters(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """The hyper-parameters of a bundle run: the top-level ids of its config whose values are set, not derived
    (numbers, booleans, strings and lists of them; expressions ``$...`` and references ``@...`` are left out).

    Args:
        config: the config as a mapping, a JSON file, or a run's ``output_dir`` (read with :func:`executed_config`);
            ``None`` (no file) gives ``{}``.
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        path = Path(config)
        if path.is_dir():
            found = executed_config(path)
            if found is None:
                return {}
            path = Path(found)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON bundle config ({e})") from e
    return {k: v for k, v in config.items() if _is_hyperparameter(str(k), v)}
