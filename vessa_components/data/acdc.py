"""ACDC (cardiac cine MRI) conventions: class names, the published labelled cases and the SSL4MIS split.

The SSL4MIS processed layout (used by SSL4MIS, UniMatch, BCP, ABD ...) is::

    ROOT/data/slices/patientXXX_frameYY_slice_K.h5   2D training slices: ``image`` float32 [H, W] in [0, 1], ``label`` uint8
    ROOT/data/patientXXX_frameYY.h5                   3D volumes: ``image`` float32 [S, H, W], ``label`` uint8 [S, H, W]
    ROOT/train_slices.list, ROOT/val.list, ROOT/test.list   one name per line, without ``.h5``

frame01 is the end-diastolic (ED) and frame02 the end-systolic (ES) frame.
"""

from __future__ import annotations

import re

__all__ = [
    "ACDC_CLASS_NAMES",
    "ACDC_LABELS",
    "FIXED_LABELED_CASES",
    "SSL4MIS_VAL_PATIENTS",
    "SSL4MIS_TEST_PATIENTS",
    "patient_of",
]

#: channel order of every ACDC network output (index = label value)
ACDC_CLASS_NAMES: tuple[str, ...] = ("background", "right_ventricle", "myocardium", "left_ventricle")
#: label value of each foreground class
ACDC_LABELS: dict[str, int] = {name: i for i, name in enumerate(ACDC_CLASS_NAMES) if i > 0}

#: the fixed labelled patients every published semi-supervised ACDC table uses, by number of labelled cases
FIXED_LABELED_CASES: dict[int, tuple[str, ...]] = {
    1: ("patient099",),
    3: ("patient099", "patient038", "patient050"),
    7: ("patient099", "patient038", "patient050", "patient100", "patient058", "patient021", "patient049"),
}

#: the SSL4MIS protocol's 10 validation and 20 test patients (the other 70 are the training pool)
SSL4MIS_VAL_PATIENTS: tuple[str, ...] = tuple(
    f"patient{i:03d}" for i in (2, 19, 28, 30, 39, 45, 78, 82, 85, 87)
)
SSL4MIS_TEST_PATIENTS: tuple[str, ...] = tuple(
    f"patient{i:03d}" for i in (1, 7, 8, 11, 13, 22, 24, 33, 52, 59, 64, 65, 66, 68, 75, 80, 81, 83, 84, 93)
)

_PATIENT_RE = re.compile(r"(patient\d+)")


def patient_of(name: str) -> str:
    """The patient id (``patientXXX``) in a slice, volume or file name."""
    match = _PATIENT_RE.search(name)
    if match is None:
        raise ValueError(f"{name}: no 'patientXXX' id in this name")
    return match.group(1)
