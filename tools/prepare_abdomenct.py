"""Convert an AbdomenCT-1K style release (``Case_XXXXX_0000.nii.gz`` images, ``Case_XXXXX.nii.gz`` masks) to the
SSL4MIS slice layout that the training bundles read.

Examples::

    python tools/prepare_abdomenct.py --image_dir AbdomenCT-1K/images --label_dir AbdomenCT-1K/labels \
        --out_dir data/abdomenct --val_fraction 0.2 --test_fraction 0.2
    python tools/prepare_abdomenct.py --image_dir CT_DIR --out_dir OUT --label_map totalsegmentator \
        --val_cases Case_00001,Case_00002 --hu_window=-160,240
"""

from __future__ import annotations

from collections.abc import Sequence

import fire

from vessa_components.data.abdomenct import ABDOMENCT_HU_WINDOW, convert_abdomenct_to_slices


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
) -> None:
    """Convert the release at ``image_dir`` (masks in ``label_dir``, default the same folder) into ``out_dir``.

    Args:
        image_dir: folder of ``<case>_0000.nii.gz`` CT volumes.
        out_dir: output root (``data/``, ``train_slices.list``, ``val.list``, ``test.list``).
        label_dir: folder of ``<case>.nii.gz`` masks.
        label_map: ``totalsegmentator`` for masks in TotalSegmentator v2 ids, or a ``{source_id: target_id}``
            dict such as ``"{5: 1, 7: 4}"`` (unmapped ids become background); omit for AbdomenCT-1K ids.
        hu_window: Hounsfield window mapped to [0, 1], e.g. ``--hu_window=-160,240``.
        cases: comma-separated case ids to convert (default: all).
        keep_empty_slices: also write training slices without foreground.
        val_cases: comma-separated validation case ids (overrides ``val_fraction``).
        val_fraction: share of cases drawn for validation.
        test_cases: comma-separated test case ids (overrides ``test_fraction``).
        test_fraction: share of cases drawn for testing.
        seed: seed of the random splits.
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
    )
    print(
        f"{out_dir}: {summary['num_train_slices']} training slices from {len(summary['train'])} cases, "
        f"{len(summary['validation'])} validation and {len(summary['test'])} test volumes"
    )


if __name__ == "__main__":
    fire.Fire(main)
