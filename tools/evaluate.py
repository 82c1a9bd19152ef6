"""Evaluate NIfTI predictions against NIfTI labels (matched by file name) and write a metrics report.

Example::

    python tools/evaluate.py --pred_dir preds --label_dir labels --out report.json --md report.md \
        --class_names background,right_ventricle,myocardium,left_ventricle
"""

from __future__ import annotations

from collections.abc import Sequence

import fire

from vessa_components.data.acdc import ACDC_CLASS_NAMES
from vessa_components.metrics import evaluate_folders, format_markdown, write_report


def main(
    pred_dir: str,
    label_dir: str,
    out: str,
    class_names: str | Sequence[str] = ACDC_CLASS_NAMES,
    md: str | None = None,
) -> None:
    """Score every prediction in ``pred_dir`` against its label, write the JSON report ``out`` (and the markdown table
    ``md``) and print the table. Nothing is written unless every input file is valid.

    Args:
        pred_dir: folder of predicted label maps (``*.nii.gz`` / ``*.nii``).
        label_dir: folder of reference label maps with the same file names.
        out: path of the JSON report.
        class_names: names of the label values 0..C, comma-separated, background first (default: ACDC's).
        md: optional path of the markdown table.
    """
    if isinstance(class_names, str):
        class_names = class_names.split(",")
    results = evaluate_folders(pred_dir, label_dir, class_names=[str(c).strip() for c in class_names])
    report = write_report(results, out, out_md=md)
    print(format_markdown(report))


if __name__ == "__main__":
    fire.Fire(main)
