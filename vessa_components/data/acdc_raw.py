"""The raw ACDC challenge layout, and its conversion to the SSL4MIS processed h5 layout.

The raw layout (as distributed by the challenge) is::

    ROOT/[training/|testing/]patientXXX/Info.cfg
    ROOT/[training/|testing/]patientXXX/patientXXX_frameYY.nii.gz      one cine frame, NIfTI (x, y, z)
    ROOT/[training/|testing/]patientXXX/patientXXX_frameYY_gt.nii.gz   its labels (0 bg, 1 RV, 2 myo, 3 LV)
    ROOT/[training/|testing/]patientXXX/patientXXX_4d.nii.gz           the whole cine (not used)

``Info.cfg`` names the end-diastolic (``ED: 1``) and end-systolic (``ES: 12``) frame numbers, the diagnostic
``Group``, ``Height`` (cm), ``Weight`` (kg) and ``NbFrame``.

The SSL4MIS layout is described in :mod:`vessa_components.data.acdc`. :func:`convert_acdc_raw_to_ssl4mis` reproduces
the SSL4MIS processing (``acdc_data_processing.py``): the NIfTI voxel array in SimpleITK's ``GetArrayFromImage``
order ``[z, y, x]``, per-volume min-max normalisation to [0, 1], ED written as ``frame01`` and ES as ``frame02``,
training volumes cut into 2D slices numbered from 1 (as in the released ``train_slices.list``). It adds one thing:
the voxel spacing (mm, in array order) as the h5 attribute ``spacing``, which readers of the original release ignore.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np

from vessa_components.data.acdc import SSL4MIS_TEST_PATIENTS, SSL4MIS_VAL_PATIENTS
from vessa_components.data.errors import DataError
from vessa_components.utils.io import atomic_path, write_text
from vessa_components.utils.progress import progress_bar

__all__ = [
    "ACDC_RAW_SUBSETS",
    "AcdcCase",
    "read_info_cfg",
    "list_raw_cases",
    "load_raw_frame",
    "split_patients",
    "convert_acdc_raw_to_ssl4mis",
]

logger = logging.getLogger(__name__)

#: sub-folders of a raw ACDC root that may hold patient folders (besides the root itself)
ACDC_RAW_SUBSETS: tuple[str, ...] = ("training", "testing")
#: the label values an ACDC ground-truth file may contain
_ACDC_LABEL_VALUES = np.array([0, 1, 2, 3])
#: the patients of the ACDC training set, the pool of the SSL4MIS split
_ACDC_TRAINING_PATIENTS: tuple[str, ...] = tuple(f"patient{i:03d}" for i in range(1, 101))
#: Info.cfg key -> (our key, parser); ED/ES are required, the rest optional
_INFO_CFG_FIELDS: dict[str, tuple[str, type]] = {
    "ED": ("ed", int),
    "ES": ("es", int),
    "Group": ("group", str),
    "Height": ("height", float),
    "Weight": ("weight", float),
    "NbFrame": ("nb_frame", int),
}
_PATIENT_DIR_RE = re.compile(r"patient\d{3}")
#: errors nibabel raises on an unreadable, truncated or corrupt (gzipped) NIfTI file
_NIFTI_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError)


@dataclasses.dataclass(frozen=True)
class AcdcCase:
    """One patient of the raw ACDC layout: its two annotated frames and their files.

    Attributes:
        patient: patient id, ``patientXXX``.
        ed_frame: frame number of end-diastole (from ``Info.cfg``).
        es_frame: frame number of end-systole (from ``Info.cfg``).
        group: diagnostic group (``NOR``, ``DCM``, ``HCM``, ``MINF``, ``RV``; ``SYNTHETIC`` for demo data).
        ed_image, ed_label, es_image, es_label: the NIfTI image and ground-truth files of the two frames.
        spacing: voxel size in mm of the ED image, in NIfTI axis order ``(x, y, z)``.
    """

    patient: str
    ed_frame: int
    es_frame: int
    group: str
    ed_image: Path
    ed_label: Path
    es_image: Path
    es_label: Path
    spacing: tuple[float, float, float]


def _parse_value(path: Path, key: str, value: str, kind: type) -> Any:
    """``value`` of ``key`` as ``kind`` (``int`` also accepts ``12.0``), or a DataError naming ``path``."""
    if kind is str:
        return value
    try:
        number = float(value)
    except ValueError:
        raise DataError(path, f"'{key}: {value}' is not a number") from None
    if kind is int:
        if not number.is_integer():
            raise DataError(path, f"'{key}: {value}' is not a whole number")
        return int(number)
    return number


def read_info_cfg(path: str | os.PathLike) -> dict[str, Any]:
    """Read an ACDC ``Info.cfg``.

    Returns:
        ``{"ed": int, "es": int, "group": str | None, "height": float | None, "weight": float | None,
        "nb_frame": int | None}``: frame numbers, diagnostic group, height (cm), weight (kg), number of cine frames.

    Raises:
        DataError: the file is missing or unreadable, a value is malformed, or the ``ED``/``ES`` line is missing.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read the patient information file ({e})") from e
    info: dict[str, Any] = {key: None for key, _ in _INFO_CFG_FIELDS.values()}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if sep and name in _INFO_CFG_FIELDS:
            key, kind = _INFO_CFG_FIELDS[name]
            info[key] = _parse_value(path, name, value, kind)
    for required in ("ED", "ES"):
        if info[_INFO_CFG_FIELDS[required][0]] is None:
            raise DataError(path, f"no '{required}: <frame number>' line")
    return info


def _patient_dirs(root: Path) -> list[Path]:
    """Patient folders in ``root`` and its ``training``/``testing`` sub-folders, sorted by patient id."""
    found: dict[str, Path] = {}
    for folder in (root, *(root / subset for subset in ACDC_RAW_SUBSETS)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_dir() and _PATIENT_DIR_RE.fullmatch(entry.name):
                if entry.name in found:
                    raise DataError(entry, f"patient {entry.name} also found at {found[entry.name]}")
                found[entry.name] = entry
    return [found[name] for name in sorted(found)]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"missing {what}")
    return path


def _nifti_spacing(path: Path) -> tuple[float, float, float]:
    """Voxel size (mm) of the first three axes of a NIfTI file, from its header."""
    try:
        zooms = nib.load(path).header.get_zooms()
    except _NIFTI_READ_ERRORS as e:
        raise DataError(path, f"unreadable NIfTI header ({e})") from e
    if len(zooms) < 3:
        raise DataError(path, f"expected a 3D image, the header has {len(zooms)} dimensions")
    return tuple(float(z) for z in zooms[:3])


def list_raw_cases(root: str | os.PathLike) -> list[AcdcCase]:
    """All patients of a raw ACDC folder (``ROOT/patientXXX`` or ``ROOT/{training,testing}/patientXXX``).

    Only headers are read here; :func:`load_raw_frame` reads and checks the voxels.

    Raises:
        DataError: no patient folder, or a patient misses its ``Info.cfg`` (or its ED/ES line) or a frame/gt file.
    """
    root = Path(root)
    patient_dirs = _patient_dirs(root)
    if not patient_dirs:
        raise DataError(root, "no patientXXX folders here or in its training/ or testing/ sub-folders")
    cases = []
    for folder in patient_dirs:
        patient = folder.name
        info = read_info_cfg(folder / "Info.cfg")
        files = {}
        for phase in ("ed", "es"):
            stem = folder / f"{patient}_frame{info[phase]:02d}"
            files[f"{phase}_image"] = _require_file(stem.with_name(stem.name + ".nii.gz"), f"{phase.upper()} image")
            files[f"{phase}_label"] = _require_file(
                stem.with_name(stem.name + "_gt.nii.gz"), f"{phase.upper()} ground truth"
            )
        cases.append(
            AcdcCase(
                patient=patient,
                ed_frame=info["ed"],
                es_frame=info["es"],
                group=info["group"] or "",
                spacing=_nifti_spacing(files["ed_image"]),
                **files,
            )
        )
    return cases


def _read_nifti(path: Path, dtype: type) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxel array of a 3D NIfTI in ``[z, y, x]`` order (SimpleITK's ``GetArrayFromImage`` order) and its
    spacing (mm) in the same order. All voxels are read here, so a truncated file fails here."""
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=dtype)
    except _NIFTI_READ_ERRORS as e:
        raise DataError(path, f"unreadable or truncated NIfTI ({e})") from e
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
    spacing_xyz = image.header.get_zooms()[:3]
    return data.transpose(2, 1, 0), tuple(float(s) for s in reversed(spacing_xyz))


def load_raw_frame(
    image_path: str | os.PathLike, label_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read one ACDC frame and its ground truth as the SSL4MIS processing does.

    Returns:
        ``(image, label, spacing)``: ``image`` float32 ``[z, y, x]`` min-max normalised to [0, 1]; ``label`` uint8
        ``[z, y, x]`` with values in {0, 1, 2, 3}; ``spacing`` the voxel size in mm in the same ``(z, y, x)`` order.

    Raises:
        DataError: a file is unreadable or truncated, not 3D, the shapes differ, the image is constant, or the
            labels hold values other than 0-3.
    """
    image_path, label_path = Path(image_path), Path(label_path)
    image, spacing = _read_nifti(image_path, np.float32)
    label, _ = _read_nifti(label_path, np.float32)
    if label.shape != image.shape:
        raise DataError(
            label_path, f"label shape {label.shape} (z, y, x) differs from image {image_path.name} {image.shape}"
        )
    unexpected = np.setdiff1d(np.unique(label), _ACDC_LABEL_VALUES)
    if unexpected.size:
        raise DataError(label_path, f"label values {unexpected.tolist()} outside the ACDC labels {{0, 1, 2, 3}}")
    low, high = float(image.min()), float(image.max())
    if not np.isfinite([low, high]).all() or high <= low:
        raise DataError(image_path, f"image intensities span [{low}, {high}], cannot normalise to [0, 1]")
    return (image - low) / (high - low), label.astype(np.uint8), spacing


def _as_patient_id(patient: str | int) -> str:
    """``"patient002"``, ``"2"`` and ``2`` all name ``patient002`` (command lines give numbers)."""
    if isinstance(patient, int) or str(patient).isdigit():
        return f"patient{int(patient):03d}"
    return str(patient)


def split_patients(
    patients: Iterable[str],
    val_patients: Sequence[str | int] | None = None,
    test_patients: Sequence[str | int] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split patients into ``train``/``val``/``test`` (and ``unused``) lists, each sorted.

    - Given ``val_patients`` and/or ``test_patients``: those, and every other patient is training.
    - Otherwise, when all 100 ACDC training patients are present and no ``val_fraction`` is given: the SSL4MIS split
      (10 validation, 20 test, 70 training patients). Other patients (the challenge's testing set) are ``unused``
      so the lists stay those of the published protocol.
    - Otherwise a random ``val_fraction`` (default 0.2) of the patients, drawn with ``seed``, is validation.

    Raises:
        ValueError: a named patient is unknown, in both val and test, or ``val_fraction`` is outside [0, 1).
    """
    patients = sorted(set(patients))
    if val_patients is not None or test_patients is not None:
        if val_fraction is not None:
            raise ValueError("give either val_patients/test_patients or val_fraction, not both")
        val = sorted({_as_patient_id(p) for p in val_patients or ()})
        test = sorted({_as_patient_id(p) for p in test_patients or ()})
        unknown = sorted(set(val + test) - set(patients))
        if unknown:
            raise ValueError(f"patients {unknown} are not in the data set")
        if set(val) & set(test):
            raise ValueError(f"patients {sorted(set(val) & set(test))} are in both val and test")
        unused: list[str] = []
    elif val_fraction is None and set(_ACDC_TRAINING_PATIENTS) <= set(patients):
        val, test = sorted(SSL4MIS_VAL_PATIENTS), sorted(SSL4MIS_TEST_PATIENTS)
        unused = sorted(set(patients) - set(_ACDC_TRAINING_PATIENTS))
    else:
        val_fraction = 0.2 if val_fraction is None else val_fraction
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = round(val_fraction * len(patients))
        val = sorted(np.random.default_rng(seed).permutation(patients)[:n_val].tolist())
        test, unused = [], []
    held_out = set(val) | set(test) | set(unused)
    return {"train": [p for p in patients if p not in held_out], "val": val, "test": test, "unused": unused}


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> None:
    """One SSL4MIS h5 file (gzip-compressed ``image``/``label`` as in the release, plus ``spacing``), atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
        f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)


def convert_acdc_raw_to_ssl4mis(
    raw_root: str | os.PathLike,
    out_root: str | os.PathLike,
    val_patients: Sequence[str | int] | None = None,
    test_patients: Sequence[str | int] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Convert a raw ACDC folder to the SSL4MIS processed layout under ``out_root``.

    Training patients are written as 2D slices (``data/slices/patientXXX_frameYY_slice_K.h5``, ``K`` from 1, listed
    in ``train_slices.list``), validation and test patients as volumes (``data/patientXXX_frameYY.h5``, listed in
    ``val.list`` and ``test.list``). ED becomes ``frame01`` and ES ``frame02``. The split follows
    :func:`split_patients`. Every input file is read and checked before anything is written, each file is written
    atomically and the list files come last, so a failed run leaves no usable-looking output.

    Args:
        raw_root: the raw ACDC folder (see :func:`list_raw_cases`).
        out_root: where the SSL4MIS layout is written; it must be absent or empty unless ``overwrite``.
        val_patients, test_patients, val_fraction, seed: the split, see :func:`split_patients`.
        overwrite: allow writing into a non-empty ``out_root`` (files of the same name are replaced).
        progress: show progress bars over the frames (``None``: when stderr is a terminal).

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "unused": [...]}`` patient ids, plus ``"train_slices"`` and
        ``"volumes"``: the numbers of slice and volume files written.

    Raises:
        DataError: a bad input file (named in the message); nothing is written then.
        FileExistsError: ``out_root`` is not empty and ``overwrite`` is False.
    """
    out_root = Path(out_root)
    if not overwrite and out_root.is_dir() and any(out_root.iterdir()):
        raise FileExistsError(f"{out_root}: not empty; choose an empty folder or pass overwrite=True")
    cases = {case.patient: case for case in list_raw_cases(raw_root)}
    split = split_patients(cases, val_patients, test_patients, val_fraction, seed)
    frames = [
        (patient, f"{patient}_{frame}", image, label)
        for patient in sorted(cases)
        if patient not in split["unused"]
        for frame, image, label in (
            ("frame01", cases[patient].ed_image, cases[patient].ed_label),
            ("frame02", cases[patient].es_image, cases[patient].es_label),
        )
    ]
    # Reading everything twice (check, then write) keeps memory at one volume, whatever the data set size.
    for _, _, image_path, label_path in progress_bar(frames, progress, desc="checking ACDC frames", unit="frame"):
        load_raw_frame(image_path, label_path)

    lists: dict[str, list[str]] = {"train_slices.list": [], "val.list": [], "test.list": []}
    for patient, name, image_path, label_path in progress_bar(frames, progress, desc="converting ACDC", unit="frame"):
        image, label, spacing = load_raw_frame(image_path, label_path)
        if patient in split["train"]:
            for k in range(image.shape[0]):
                slice_name = f"{name}_slice_{k + 1}"
                _write_h5(out_root / "data" / "slices" / f"{slice_name}.h5", image[k], label[k], spacing[1:])
                lists["train_slices.list"].append(slice_name)
        else:
            _write_h5(out_root / "data" / f"{name}.h5", image, label, spacing)
            lists["val.list" if patient in split["val"] else "test.list"].append(name)
    for list_name, names in lists.items():
        write_text(out_root / list_name, "".join(f"{n}\n" for n in names))
    if split["unused"]:
        logger.warning(
            "%d patients outside the SSL4MIS protocol were not converted: %s",
            len(split["unused"]),
            ", ".join(split["unused"]),
        )
    return {
        **split,
        "train_slices": len(lists["train_slices.list"]),
        "volumes": len(lists["val.list"]) + len(lists["test.list"]),
    }
