"""Convert an AbdomenCT-1K style release (``Case_XXXXX_0000.nii.gz`` images, ``Case_XXXXX.nii.gz`` masks) to the
SSL4MIS slice layout that the training bundles read.

Examples::

    python tools/prepare_abdomenct.py --image_dir AbdomenCT-1K/images --label_dir AbdomenCT-1K/labels \
        --out_dir data/abdomenct --val_fraction 0.2 --test_fraction 0.2
    python tools/prepare_abdomenct.py --image_dir CT_DIR --out_dir OUT --label_map totalsegmentator \
        --val_cases Case_00001,Case_00002 --hu_window=-160,240
    # one CT named <case>_ct_sm.nii.gz / <case>_seg.nii.gz, cut into 5 axial parts that act as cases
    python tools/prepare_abdomenct.py --image_dir ../shared/data/abdomen_ct_example --out_dir OUT \
        --image_suffix _ct_sm.nii.gz --label_suffix _seg.nii.gz --label_map totalsegmentator --axial_parts 5
"""

from __future__ import annotations

from collections.abc import Sequence

import fire

from vessa_components.data.abdomenct import (
    ABDOMENCT_HU_WINDOW,
    ABDOMENCT_IMAGE_SUFFIX,
    ABDOMENCT_LABEL_SUFFIX,
    convert_abdomenct_to_slices,
)


def _case_list(value: str | Sequence[str] | None) -> list[str] | None:
    """Case ids from the command line: fire passes ``a,b`` as a tuple and ``a`` as a string."""
    if value is None:
        return None
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return [str(c) for c in value]


def main(
    image_dir: str,
    out_dir: str,
    label_dir: str | None = None,
    label_map: str | dict[int, int] | None = None,
    hu_window: Sequence[float] = ABDOMENCT_HU_WINDOW,
    cases: str | Sequence[str] | None = None,
    keep_empty_slices: bool = True,
    val_cases: str | Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_cases: str | Sequence[str] | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    image_suffix: str = ABDOMENCT_IMAGE_SUFFIX,
    label_suffix: str = ABDOMENCT_LABEL_SUFFIX,
    axial_parts: int = 1,
) -> None:
    """Convert the release at ``image_dir`` (masks in ``label_dir``, default the same folder) into ``out_dir``.

    Args:
        image_dir: folder of ``<case>_0000.nii.gz`` CT volumes.
        out_dir: output root (``data/``, ``train_slices.list``, ``val.list``, ``test.list``).
        label_dir: folder of ``<case>.nii.gz`` masks.
        label_map: ``totalsegmentator`` for masks in TotalSegmentator v2 ids, or a ``{source_id: target}`` dict
            with AbdomenCT-1K ids or class names such as ``"{5: 1, 7: 'pancreas'}"`` (unmapped ids become
            background); omit for AbdomenCT-1K ids.
        hu_window: Hounsfield window mapped to [0, 1], e.g. ``--hu_window=-160,240``.
        cases: comma-separated case ids to convert (default: all).
        keep_empty_slices: also write training slices without foreground.
        val_cases: comma-separated validation case ids (overrides ``val_fraction``).
        val_fraction: share of cases drawn for validation.
        test_cases: comma-separated test case ids (overrides ``test_fraction``).
        test_fraction: share of cases drawn for testing.
        seed: seed of the random splits.
        image_suffix: how image file names end (default ``_0000.nii.gz``).
        label_suffix: how mask file names end (default ``.nii.gz``).
        axial_parts: cut every case into this many contiguous axial parts ``<case>_part<k>`` that the splits
            treat as cases (for sets of one or two cases).
    """
    summary = convert_abdomenct_to_slices(
        image_dir,
        out_dir,
        label_dir=label_dir,
        label_map=label_map,
        hu_window=hu_window,
        cases=_case_list(cases),
        keep_empty_slices=keep_empty_slices,
        val_cases=_case_list(val_cases),
        val_fraction=val_fraction,
        test_cases=_case_list(test_cases),
        test_fraction=test_fraction,
        seed=seed,
        image_suffix=image_suffix,
        label_suffix=label_suffix,
        axial_parts=axial_parts,
    )
    print(
        f"{out_dir}: {summary['num_train_slices']} training slices from {len(summary['train'])} cases, "
        f"{len(summary['validation'])} validation and {len(summary['test'])} test volumes"
    )


if __name__ == "__main__":
    fire.Fire(main)
