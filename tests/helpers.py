"""Helpers shared by tests."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_acdc_subset(
    acdc_root: Path, dst: Path, patients: tuple[str, ...], slice_step: int = 1, n_volumes: int = 2
) -> Path:
    """A small SSL4MIS-layout data set in ``dst`` (a test's temporary folder) made of real ACDC files: the training
    slices of ``patients`` (every ``slice_step``-th) and the first ``n_volumes`` validation volumes."""
    (dst / "data" / "slices").mkdir(parents=True)
    names = [
        n
        for n in (acdc_root / "train_slices.list").read_text().split()
        if n.split("_frame")[0] in patients and int(n.rsplit("_", 1)[1]) % slice_step == 0
    ]
    for n in names:
        shutil.copy(acdc_root / "data" / "slices" / f"{n}.h5", dst / "data" / "slices")
    volumes = (acdc_root / "val.list").read_text().split()[:n_volumes]
    for v in volumes:
        shutil.copy(acdc_root / "data" / f"{v}.h5", dst / "data")
    (dst / "train_slices.list").write_text("\n".join(names) + "\n")
    (dst / "val.list").write_text("\n".join(volumes) + "\n")
    return dst
