"""Labelled / unlabelled splits by patient (never by slice, so no patient is on both sides)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

from .errors import DataError

__all__ = ["parse_labeled_cases", "select_labeled_patients"]


def parse_labeled_cases(value: int | float | str | Sequence[str]) -> int | float | list[str]:
    """Normalise a ``labeled_cases`` setting.

    Accepted forms:
        - an integer ``n`` (or ``"3"``): the first ``n`` patients of the data set's training list, in list order.
          On the SSL4MIS ACDC release this is exactly the published fixed cases (1: 099; 3: + 038, 050;
          7: + 100, 058, 021, 049), because ``train_slices.list`` starts with them;
        - a fraction ``0 < f < 1`` or a percentage string ``"5%"``: that share of patients (rounded up, at least one),
          drawn with the split seed;
        - patient ids: ``"patient099,patient038"``, ``"099,038"`` or a list of them.
    """
    if isinstance(value, bool):
        raise ValueError(f"labeled_cases: expected a count, a fraction or patient ids, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer() and value >= 1:
            return int(value)
        if 0 < value < 1:
            return value
        raise ValueError(f"labeled_cases: a fraction must lie in (0, 1), got {value}")
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            return parse_labeled_cases(float(text[:-1]) / 100.0)
        # "099" is a patient number, "3" a count, "0.05" a fraction
        looks_like_id = "," in text or (text.isdigit() and text.startswith("0"))
        if not looks_like_id:
            try:
                return parse_labeled_cases(float(text))
            except ValueError:
                pass
        return [t.strip() for t in text.split(",") if t.strip()]
    return [str(v).strip() for v in value]


def _match_patient(requested: str, patients: Sequence[str]) -> str | None:
    """Find ``requested`` among ``patients``: exactly, or by number (``"099"`` -> ``patient099``)."""
    if requested in patients:
        return requested
    if requested.isdigit():
        for p in patients:
            trailing = re.search(r"(\d+)$", p)
            if trailing and int(trailing.group(1)) == int(requested):
                return p
    return None


def select_labeled_patients(
    patients: Sequence[str], labeled_cases: int | float | str | Sequence[str], seed: int = 0, source: str | None = None
) -> tuple[list[str], list[str]]:
    """Split ``patients`` (in the data set's list order) into labelled and unlabelled patients.

    Args:
        patients: patient ids in list order, without duplicates.
        labeled_cases: see :func:`parse_labeled_cases`.
        seed: seed of the random draw for fractions.
        source: the file or folder the patients came from, named in errors.

    Raises:
        DataError: a requested patient is not in the data, or a split would be empty.
    """
    patients = list(dict.fromkeys(patients))
    if not patients:
        raise DataError(source, "no training patients found: the split is empty")
    spec = parse_labeled_cases(labeled_cases)
    if isinstance(spec, int):
        if not 1 <= spec <= len(patients):
            raise DataError(source, f"labeled_cases={spec} but the data has {len(patients)} training patients")
        labeled = patients[:spec]
    elif isinstance(spec, float):
        n = max(1, math.ceil(round(spec * len(patients), 6)))  # round: 0.07 * 100 is 7.000000000000001
        labeled = sorted(random.Random(seed).sample(patients, n), key=patients.index)
    else:
        labeled, unknown = [], []
        for requested in spec:
            match = _match_patient(requested, patients)
            (labeled if match is not None else unknown).append(match if match is not None else requested)
        if unknown:
            raise DataError(source, f"labelled patients not in the data: {unknown} (known: {patients[:5]}...)")
        if not labeled:
            raise DataError(source, "labeled_cases names no patient: the labelled split is empty")
        labeled = list(dict.fromkeys(labeled))
    chosen = set(labeled)
    return labeled, [p for p in patients if p not in chosen]
