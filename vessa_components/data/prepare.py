"""Turn whatever layout a bundle is pointed at into the slice layout its training reads."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from .acdc_raw import convert_acdc_raw_to_ssl4mis
from .demo import SYNTHETIC_MARKER, make_demo_acdc
from .errors import DataError

__all__ = ["DATA_LAYOUTS", "prepare_dataset"]

#: ``ssl4mis``: the SSL4MIS processed layout, used as is; ``acdc_raw``: the ACDC challenge download, converted once;
#: ``demo``: a synthetic ACDC-like set generated in ``dataset_dir`` when absent (no download needed), then converted.
DATA_LAYOUTS = ("ssl4mis", "acdc_raw", "demo")


def _is_converted(root: Path) -> bool:
    # the converter writes the list files last: their presence means a complete conversion
    return (root / "train_slices.list").is_file() and (root / "val.list").is_file()


def prepare_dataset(
    dataset_dir: str | os.PathLike, layout: str, work_dir: str | os.PathLike, seed: int = 0
) -> str:
    """Return the root of the slice layout for ``dataset_dir``, converting (and for ``demo`` generating) it if needed.

    Conversions go to ``work_dir/<layout>_ssl4mis`` and are reused by later runs. In distributed runs rank 0 does the
    work while the other ranks wait.

    Args:
        dataset_dir: the data set as the user has it.
        layout: one of :data:`DATA_LAYOUTS`.
        work_dir: folder for converted data (e.g. ``<output_dir>/prepared_data``).
        seed: seed of the demo data and of the validation draw of converted sets without a standard split.
    """
    if layout not in DATA_LAYOUTS:
        raise ValueError(f"unknown data_layout '{layout}'; choose one of {DATA_LAYOUTS}")
    dataset_dir = Path(dataset_dir)
    if layout == "ssl4mis":
        if not dataset_dir.is_dir():
            raise DataError(dataset_dir, "dataset_dir does not exist")
        return str(dataset_dir)
    out = Path(work_dir) / f"{layout}_ssl4mis"
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        if layout == "demo" and not (dataset_dir / SYNTHETIC_MARKER).is_file():
            make_demo_acdc(dataset_dir, seed=seed)
        if layout == "acdc_raw" and not dataset_dir.is_dir():
            raise DataError(dataset_dir, "dataset_dir does not exist")
        if not _is_converted(out):
            convert_acdc_raw_to_ssl4mis(dataset_dir, out, seed=seed, overwrite=True)
    if distributed:
        dist.barrier()
    return str(out)
