"""Convert the raw ACDC challenge download to the SSL4MIS processed h5 layout that training reads.

Examples::

    python tools/prepare_acdc.py --raw_root ACDC/database --out_root acdc_ssl4mis      # the SSL4MIS split
    python tools/prepare_acdc.py --raw_root RAW --out_root OUT --val_patients 2,19 --test_patients patient001
    python tools/prepare_acdc.py --raw_root RAW --out_root OUT --val_fraction 0.2 --seed 1
"""

from __future__ import annotations

from collections.abc import Sequence

import fire

from vessa_components.data.acdc_raw import convert_acdc_raw_to_ssl4mis


def _patients(value: str | int | Sequence[str | int] | None) -> list[str | int] | None:
    """fire gives one id as a scalar and several (``a,b``) as a tuple."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def main(
    raw_root: str,
    out_root: str,
    val_patients: str | int | Sequence[str | int] | None = None,
    test_patients: str | int | Sequence[str | int] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Convert ``raw_root`` into ``out_root`` and print the split.

    Args:
        raw_root: raw ACDC folder (``patientXXX`` folders in it or in its ``training``/``testing`` sub-folders).
        out_root: output folder (absent or empty unless ``overwrite``).
        val_patients: validation patients (``patient002`` or ``2``, comma-separated); the rest train.
        test_patients: test patients, same form.
        val_fraction: fraction of patients drawn for validation (default 0.2 when the set is not the standard 100).
        seed: seed of that draw.
        overwrite: allow writing into a non-empty ``out_root``.
    """
    summary = convert_acdc_raw_to_ssl4mis(
        raw_root, out_root, _patients(val_patients), _patients(test_patients), val_fraction, seed, overwrite
    )
    print(f"{out_root}: {summary['train_slices']} training slices, {summary['volumes']} volumes")
    for split in ("train", "val", "test", "unused"):
        print(f"  {split}: {len(summary[split])} patients")


if __name__ == "__main__":
    fire.Fire(main)
