"""Write a MONAI datalist JSON (``labeled`` / ``unlabeled`` / ``validation``) for a data set.

Examples::

    python tools/make_datalist.py --layout ssl4mis --root ../shared/data/acdc_ssl4mis --labeled_cases 3 --out datalist.json
    python tools/make_datalist.py --layout ssl4mis --root DIR --labeled_cases patient099,patient038 --out datalist.json
    python tools/make_datalist.py --layout abdomenct1k --root CONVERTED_DIR --labeled_cases 5% --out datalist.json
"""

from __future__ import annotations

import fire

from vessa_components.data import make_slice_datalist, write_datalist

LAYOUTS = ("ssl4mis", "abdomenct1k")


def main(
    root: str,
    out: str,
    layout: str = "ssl4mis",
    labeled_cases: str | int | float = 3,
    seed: int = 0,
    val_list: str = "val.list",
) -> None:
    """Write the datalist of the data set at ``root`` to ``out``.

    Args:
        root: data set root in the slice layout (SSL4MIS ACDC, or AbdomenCT-1K converted by ``tools/prepare_abdomenct.py``).
        out: output JSON path.
        layout: ``ssl4mis`` or ``abdomenct1k`` (both are read from the same slice layout).
        labeled_cases: a count (first n training patients; 1/3/7 are the published ACDC cases), a percentage
            ("5%"), or comma-separated patient / case ids.
        seed: seed for percentage splits.
        val_list: list file of validation volumes.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; choose one of {LAYOUTS}")
    if isinstance(labeled_cases, tuple):  # fire parses "a,b" as a tuple
        labeled_cases = ",".join(str(v) for v in labeled_cases)
    datalist = make_slice_datalist(root, labeled_cases=labeled_cases, seed=seed, val_list=val_list)
    write_datalist(datalist, out)
    print(
        f"{out}: {len(datalist['labeled'])} labelled slices from {len(datalist['labeled_patients'])} patients "
        f"({', '.join(datalist['labeled_patients'])}), {len(datalist['unlabeled'])} unlabelled slices, "
        f"{len(datalist['validation'])} validation volumes"
    )


if __name__ == "__main__":
    fire.Fire(main)
