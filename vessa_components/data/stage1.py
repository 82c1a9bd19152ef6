"""The labelled data of VESSA's Stage-1 training: several data sets, each with its modality and class names.

The paper pre-trains VESSA on seven medical data sets at once. A bundle names them in one list (``datasets``); each
item is one of

- a **datalist JSON** (``tools/make_datalist.py``): its ``labeled`` entries train, its ``validation`` entries (if any)
  validate; the JSON may carry ``name``, ``modality`` and ``class_names`` at the top level;
- a **data set folder** in the slice layout (``train_slices.list``, ``val.list``, ``data/``): split into labelled and
  unlabelled patients by ``labeled_cases`` (:func:`vessa_components.data.make_slice_datalist`);
- a **mapping** ``{"name", "modality", "class_names", "datalist" | "root", "labeled_cases"}`` saying all of it.

Missing names default to the file or folder name, missing modalities and class names to the function's defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from .acdc import ACDC_CLASS_NAMES
from .datalist import case_of, make_slice_datalist
from .errors import DataError

__all__ = ["foreground_class_names", "resolve_datasets"]

_SPEC_KEYS = {"name", "modality", "class_names", "datalist", "root", "labeled_cases"}


def _from_datalist(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "datalist not found")
    try:
        header = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not a JSON datalist: {e}") from e
    if not isinstance(header, dict) or not header.get("labeled"):
        raise DataError(path, "datalist has no 'labeled' entries (Stage 1 trains on labelled slices only)")
    labeled = load_decathlon_datalist(path, is_segmentation=True, data_list_key="labeled")
    validation = load_decathlon_datalist(path, data_list_key="validation") if header.get("validation") else []
    return {
        "name": header.get("name"),
        "modality": header.get("modality"),
        "class_names": header.get("class_names"),
        "labeled": labeled,
        "validation": validation,
    }


def _from_root(root: Path, labeled_cases: Any, seed: int) -> dict[str, Any]:
    datalist = make_slice_datalist(root, labeled_cases=labeled_cases, seed=seed)
    return {"labeled": datalist["labeled"], "validation": datalist["validation"], "root": str(root)}


def resolve_datasets(
    datasets: str | os.PathLike | Mapping[str, Any] | Sequence[str | os.PathLike | Mapping[str, Any]],
    class_names: Sequence[str] = ACDC_CLASS_NAMES,
    modality: str = "MRI",
    labeled_cases: int | float | str | Sequence[str] = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Resolve the ``datasets`` list of a Stage-1 bundle (see the module docstring) into training sets.

    Args:
        datasets: one item or a list of items (datalist JSON, data set folder, or mapping).
        class_names: class names (background first) of items that do not state theirs.
        modality: modality of items that do not state theirs, as the text prompt names it.
        labeled_cases: labelled patients of a data set folder that does not state its own.
        seed: seed of percentage-based splits.

    Returns:
        one dict per data set: ``name``, ``modality``, ``class_names`` (list, background first), ``labeled``
        (entries ``{"image", "label", "patient", "name", "dataset"}``), ``validation`` (volume entries, may be empty)
        and ``root`` (the slice-layout folder, ``None`` for a datalist).

    Raises:
        DataError: a missing or malformed datalist, an empty one, or a folder that is not in the slice layout.
        ValueError: an empty list, a mapping with unknown keys or without ``datalist`` / ``root``, or two data sets
            with one name.
    """
    if isinstance(datasets, (str, os.PathLike, Mapping)):
        datasets = [datasets]
    if not datasets:
        raise ValueError("datasets is empty: name at least one datalist or data set folder")
    resolved: list[dict[str, Any]] = []
    for item in datasets:
        spec: dict[str, Any] = dict(item) if isinstance(item, Mapping) else {}
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in datasets item {dict(spec)}; allowed: {sorted(_SPEC_KEYS)}")
        if not isinstance(item, Mapping):
            path = Path(item)
            spec["datalist" if path.suffix == ".json" or path.is_file() else "root"] = str(path)
        if "datalist" in spec:
            source = Path(spec["datalist"])
            found = _from_datalist(source)
        elif "root" in spec:
            source = Path(spec["root"])
            found = _from_root(source, spec.get("labeled_cases", labeled_cases), seed)
        else:
            raise ValueError(f"datasets item {dict(spec)} needs a 'datalist' (JSON file) or a 'root' (data set folder)")
        name = spec.get("name") or found.get("name") or source.name.removesuffix(".json")
        names = list(spec.get("class_names") or found.get("class_names") or class_names)
        entries = []
        for entry in found["labeled"]:
            slice_name = str(entry.get("name") or Path(entry["image"]).name.removesuffix(".h5"))
            entries.append({**entry, "name": slice_name, "patient": entry.get("patient") or case_of(slice_name),
                            "dataset": name})
        resolved.append(
            {
                "name": name,
                "modality": spec.get("modality") or found.get("modality") or modality,
                "class_names": names,
                "labeled": entries,
                "validation": [{**e, "dataset": name} for e in found["validation"]],
                "root": found.get("root"),
            }
        )
    seen = [d["name"] for d in resolved]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise ValueError(f"several datasets are named {duplicates}; give each a distinct 'name'")
    return resolved


def foreground_class_names(datasets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The foreground classes of all data sets (each name once, in order): the classes VESSA is prompted with.

    The same rule as :meth:`vessa_components.templates.TemplateBank.foreground_classes`, so a model built from the
    training sets and one built from the template bank they made have the same class order.
    """
    return list(dict.fromkeys(name for d in datasets for name in list(d["class_names"])[1:]))
