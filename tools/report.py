"""Turn a bundle run's outputs into a report page: learning curves, the per-class metric table and overlay figures.

Examples::

    python tools/report.py runs/acdc3                  # after training with --tracking (the run keeps its config)
    python tools/report.py runs/acdc3 --config_file bundles/vessa_ssl_acdc/configs/train.json \\
        --dataset_dir ../shared/data/acdc_ssl4mis --data_layout ssl4mis    # any run: name its config and data

Writes ``report.md``, ``report.html`` and the PNG figures to ``<run_dir>/report`` (or ``--out_dir``).
"""

from __future__ import annotations

from typing import Any

import fire

from vessa_components.reporting import make_report


def main(
    run_dir: str,
    out_dir: str | None = None,
    config_file: str | None = None,
    num_volumes: int = 2,
    slices_per_volume: int = 3,
    **overrides: Any,
) -> None:
    """Write the report of the run in ``run_dir`` and print where it is.

    Args:
        run_dir: the run's ``output_dir`` (``logs/``, ``mlruns.db``, ``validation/``, ``eval/``, ``models/model.pt``).
        out_dir: folder of the report (default ``<run_dir>/report``).
        config_file: bundle config for the overlays (default: the ``config_<time>.json`` that ``--tracking`` saved);
            a list of files as ``"['train.json','evaluate.json']"``.
        num_volumes: validation volumes in the overlay figures.
        slices_per_volume: slices per volume in the overlay figures.
        overrides: other ``--<id> value`` flags set config ids for the overlays (``--dataset_dir``, ``--data_layout``).
    """
    paths = make_report(run_dir, out_dir, config_file, num_volumes, slices_per_volume, overrides)
    print(f"{paths['html']}\n{paths['markdown']}")


if __name__ == "__main__":
    fire.Fire(main)
