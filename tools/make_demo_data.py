"""Generate a SYNTHETIC demo data set, so the whole pipeline runs with no download. Never report accuracy on it.

``--kind acdc`` (default): cardiac cine MRI like ACDC, in the raw challenge layout (optionally also converted to the
SSL4MIS layout). ``--kind abdomenct``: abdominal CT like AbdomenCT-1K (liver, kidney, spleen, pancreas in Hounsfield
units), as ``Case_XXXXX_0000.nii.gz`` / ``Case_XXXXX.nii.gz`` (optionally also converted to axial slices).

Examples::

    python tools/make_demo_data.py --out demo_data/raw --ssl4mis_out demo_data/ssl4mis --n_patients 12 --seed 0
    python tools/make_demo_data.py --kind abdomenct --out demo_ct/nifti --ssl4mis_out demo_ct/slices --n_patients 10
"""

from __future__ import annotations

import fire

from vessa_components.data.demo import make_demo_acdc
from vessa_components.data.demo_abdomenct import make_demo_abdomenct

#: default number of patients (cases) per kind
_DEFAULT_COUNT = {"acdc": 12, "abdomenct": 10}


def main(
    out: str, n_patients: int | None = None, seed: int = 0, ssl4mis_out: str | None = None, kind: str = "acdc"
) -> None:
    """Write ``n_patients`` synthetic patients (cases) to ``out`` (and their slice-layout conversion to
    ``ssl4mis_out``).

    Args:
        out: output folder (empty, absent, or earlier demo data).
        n_patients: number of synthetic patients (CT: cases); default 12 for ``acdc``, 10 for ``abdomenct``.
        seed: random seed; the same seed gives the same data.
        ssl4mis_out: optional folder for the converted slice layout (20 % of the patients for validation).
        kind: ``acdc`` (cardiac MRI) or ``abdomenct`` (abdominal CT).
    """
    if kind not in _DEFAULT_COUNT:
        raise ValueError(f"unknown kind '{kind}'; choose one of {sorted(_DEFAULT_COUNT)}")
    count = _DEFAULT_COUNT[kind] if n_patients is None else n_patients
    if kind == "abdomenct":
        summary = make_demo_abdomenct(out, n_cases=count, seed=seed, slices_root=ssl4mis_out)
        print(f"{out}: {len(summary['cases'])} SYNTHETIC abdominal CT cases (AbdomenCT-1K naming)")
        if ssl4mis_out is not None:
            converted = summary["slices"]
            print(
                f"{ssl4mis_out}: {len(converted['train'])} training cases ({converted['num_train_slices']} slices), "
                f"{len(converted['validation'])} validation volumes"
            )
        return
    summary = make_demo_acdc(out, n_patients=count, seed=seed, ssl4mis_root=ssl4mis_out)
    print(f"{out}: {len(summary['patients'])} SYNTHETIC patients (raw ACDC layout)")
    if ssl4mis_out is not None:
        converted = summary["ssl4mis"]
        print(
            f"{ssl4mis_out}: {len(converted['train'])} training patients ({converted['train_slices']} slices), "
            f"{len(converted['val'])} validation patients ({converted['volumes']} volumes)"
        )


if __name__ == "__main__":
    fire.Fire(main)
