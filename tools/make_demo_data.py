"""Generate the SYNTHETIC ACDC-like demo data set (raw layout, optionally also converted to the SSL4MIS layout), so
the whole pipeline runs with no download. Never report accuracy on it.

Example::

    python tools/make_demo_data.py --out demo_data/raw --ssl4mis_out demo_data/ssl4mis --n_patients 12 --seed 0
"""

from __future__ import annotations

import fire

from vessa_components.data.demo import make_demo_acdc


def main(out: str, n_patients: int = 12, seed: int = 0, ssl4mis_out: str | None = None) -> None:
    """Write ``n_patients`` synthetic patients to ``out`` (and their SSL4MIS conversion to ``ssl4mis_out``).

    Args:
        out: folder of the raw ACDC layout (empty, absent, or earlier demo data).
        n_patients: number of synthetic patients.
        seed: random seed; the same seed gives the same data.
        ssl4mis_out: optional folder for the SSL4MIS processed layout (20 % of the patients for validation).
    """
    summary = make_demo_acdc(out, n_patients=n_patients, seed=seed, ssl4mis_root=ssl4mis_out)
    print(f"{out}: {len(summary['patients'])} SYNTHETIC patients (raw ACDC layout)")
    if ssl4mis_out is not None:
        converted = summary["ssl4mis"]
        print(
            f"{ssl4mis_out}: {len(converted['train'])} training patients ({converted['train_slices']} slices), "
            f"{len(converted['val'])} validation patients ({converted['volumes']} volumes)"
        )


if __name__ == "__main__":
    fire.Fire(main)
