"""AbdomenCT-1K (abdominal CT: liver, kidney, spleen, pancreas): release layout, label remapping, HU windowing,
axial slicing, conversion to the SSL4MIS slice layout, and datalists.

The release holds ``Case_XXXXX_0000.nii.gz`` images and ``Case_XXXXX.nii.gz`` masks (nnU-Net naming), in one folder
or in separate image and label folders. :func:`convert_abdomenct_to_slices` writes the layout that the ACDC SSL4MIS
release uses, so one training pipeline serves both data sets::

    OUT/data/slices/Case_XXXXX_slice_K.h5   training slices: ``image`` float32 [H, W] in [0, 1], ``label`` uint8 [H, W],
                                            attrs ``spacing`` (mm, [H, W]), ``slice_index``, ``source``
    OUT/data/Case_XXXXX.h5                  validation / test volumes: ``image`` float32 [S, H, W], ``label`` uint8,
                                            attrs ``spacing`` (mm, [S, H, W]), ``source``
    OUT/train_slices.list, OUT/val.list[, OUT/test.list]   one name per line, without ``.h5``
    OUT/conversion.json                     the settings and split of the conversion

With ``axial_parts > 1`` every case is cut into that many contiguous axial slabs, each named
``<case>_part<k>`` and treated as a case of its own by the splits; this lets a data set of one or two CT volumes
still give disjoint labelled, unlabelled and validation sets (for checking the pipeline, not for measuring accuracy).

Orientation: volumes are brought to RAS+ (nibabel's closest canonical orientation), where the axial axis is the
last one; every axial slice is then shown the radiological way: rows run anterior -> posterior, columns run from
the patient's right to their left (the patient's right is on the viewer's left). ``K`` counts slices from inferior
(0) to superior.
"""

from __future__ import annotations

import math
import os
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
from monai.transforms import ScaleIntensityRange
from monai.utils import convert_to_numpy
from nibabel.filebasedimages import ImageFileError

from ..transforms.ct import RemapLabels
from ..transforms.label import CheckLabelRange
from ..utils.io import atomic_path, write_json, write_text
from ..utils.progress import progress_bar
from .datalist import case_of, make_slice_datalist, read_list_file
from .errors import DataError

__all__ = [
    "ABDOMENCT_CLASS_NAMES",
    "ABDOMENCT_LABELS",
    "ABDOMENCT_HU_WINDOW",
    "TOTALSEGMENTATOR_TO_ABDOMENCT1K",
    "LABEL_MAP_PRESETS",
    "ABDOMENCT_IMAGE_SUFFIX",
    "ABDOMENCT_LABEL_SUFFIX",
    "axial_part_bounds",
    "resolve_label_map",
    "find_abdomenct_cases",
    "hu_window_transform",
    "load_abdomenct_case",
    "to_axial_stack",
    "axial_slices",
    "convert_abdomenct_to_slices",
    "make_abdomenct_datalist",
]

#: channel order of every AbdomenCT-1K network output (index = label value)
ABDOMENCT_CLASS_NAMES: tuple[str, ...] = ("background", "liver", "kidney", "spleen", "pancreas")
#: label value of each foreground class
ABDOMENCT_LABELS: dict[str, int] = {name: i for i, name in enumerate(ABDOMENCT_CLASS_NAMES) if i > 0}
#: the abdominal soft-tissue window (Hounsfield units) mapped to [0, 1]
ABDOMENCT_HU_WINDOW: tuple[float, float] = (-160.0, 240.0)

#: TotalSegmentator v2 ids (spleen 1, kidney_right 2, kidney_left 3, liver 5, pancreas 7) -> AbdomenCT-1K ids;
#: both kidneys become the one AbdomenCT-1K kidney class, every other structure becomes background
TOTALSEGMENTATOR_TO_ABDOMENCT1K: dict[int, int] = {5: 1, 2: 2, 3: 2, 1: 3, 7: 4}
#: label maps by the name the command line and configs use
LABEL_MAP_PRESETS: dict[str, dict[int, int]] = {"totalsegmentator": TOTALSEGMENTATOR_TO_ABDOMENCT1K}

#: file name endings of the AbdomenCT-1K (nnU-Net) release: ``<case>_0000.nii.gz`` images, ``<case>.nii.gz`` masks
ABDOMENCT_IMAGE_SUFFIX = "_0000.nii.gz"
ABDOMENCT_LABEL_SUFFIX = ".nii.gz"
_IMAGE_SUFFIX = ABDOMENCT_IMAGE_SUFFIX
_MASK_SUFFIX = ABDOMENCT_LABEL_SUFFIX
#: voxel sizes (mm) and affines of an image and its mask must agree to this absolute tolerance
_GEOMETRY_ATOL = 1e-3
#: nibabel's errors for a file that is not NIfTI, truncated (gzip ends early) or corrupt
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def _target_id(source: Any, target: Any) -> int:
    """The AbdomenCT-1K id of one label-map target: a class name of :data:`ABDOMENCT_CLASS_NAMES` or an id."""
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        name = target.strip().lower()
        if name not in ABDOMENCT_CLASS_NAMES:
            raise ValueError(
                f"label_map: unknown class name '{target}' (for source id {source}); the classes are "
                f"{list(ABDOMENCT_CLASS_NAMES)}"
            )
        return ABDOMENCT_CLASS_NAMES.index(name)
    return int(target)


def resolve_label_map(label_map: str | Mapping[Any, Any] | None) -> dict[int, int] | None:
    """A label map given by preset name (see :data:`LABEL_MAP_PRESETS`), as a mapping, or ``None`` (no remapping).

    A mapping goes from source ids to AbdomenCT-1K ids or class names, e.g. ``{5: "liver", 2: "kidney", 3: 2}``;
    keys may be strings of digits (JSON objects have string keys).

    Raises:
        ValueError: an unknown preset or class name, or a source id that is not an integer.
    """
    if label_map is None:
        return None
    if isinstance(label_map, str):
        if label_map.lower() not in LABEL_MAP_PRESETS:
            raise ValueError(f"unknown label_map preset '{label_map}'; choose one of {sorted(LABEL_MAP_PRESETS)}")
        return dict(LABEL_MAP_PRESETS[label_map.lower()])
    try:
        return {int(k): _target_id(k, v) for k, v in label_map.items()}
    except (TypeError, ValueError) as e:
        if "label_map" in str(e):
            raise
        raise ValueError(f"label_map: source ids and targets must be integers or class names, got {label_map}") from e


def find_abdomenct_cases(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    cases: Sequence[str] | None = None,
    image_suffix: str = ABDOMENCT_IMAGE_SUFFIX,
    label_suffix: str = ABDOMENCT_LABEL_SUFFIX,
) -> list[dict[str, str]]:
    """Pair each ``<case><image_suffix>`` image (default ``<case>_0000.nii.gz``) with its ``<case><label_suffix>``
    mask (default ``<case>.nii.gz``).

    Args:
        image_dir: folder of the images.
        label_dir: folder of the masks (default: ``image_dir``).
        cases: case ids to keep (default: all), e.g. ``["Case_00001"]``.
        image_suffix: how image file names end; what precedes it is the case id.
        label_suffix: how mask file names end. Files in ``image_dir`` that end with it are masks, never images
            (so ``.nii.gz`` images with ``_seg.nii.gz`` masks in one folder pair up).

    Returns:
        ``[{"case": "Case_00001", "image": path, "label": path}, ...]`` sorted by case id.

    Raises:
        DataError: no image found, a requested case has no image, or an image has no mask.
    """
    image_dir = Path(image_dir)
    label_dir = image_dir if label_dir is None else Path(label_dir)
    if not image_dir.is_dir():
        raise DataError(image_dir, "image folder not found")
    if not image_suffix or not label_suffix:
        raise ValueError("image_suffix and label_suffix must not be empty")
    masks_among_images = label_dir == image_dir and label_suffix != image_suffix and label_suffix.endswith(image_suffix)
    images = {
        p.name[: -len(image_suffix)]: p
        for p in sorted(image_dir.glob(f"*{image_suffix}"))
        if len(p.name) > len(image_suffix) and not (masks_among_images and p.name.endswith(label_suffix))
    }
    if not images:
        raise DataError(image_dir, f"no '<case>{image_suffix}' images in this folder")
    if cases is not None:
        unknown = [c for c in cases if c not in images]
        if unknown:
            raise DataError(image_dir, f"cases {unknown} have no image here (found {sorted(images)[:5]}...)")
        images = {c: images[c] for c in sorted(set(cases))}
    pairs = []
    for case, image in images.items():
        label = label_dir / f"{case}{label_suffix}"
        if not label.is_file():
            raise DataError(label, f"mask of image {image.name} not found")
        pairs.append({"case": case, "image": str(image), "label": str(label)})
    return pairs


def hu_window_transform(hu_window: Sequence[float] = ABDOMENCT_HU_WINDOW) -> ScaleIntensityRange:
    """The transform that maps the Hounsfield window ``(low, high)`` linearly to [0, 1], clipping values outside."""
    low, high = (float(v) for v in hu_window)
    if not low < high:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)}")
    return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


def _load_canonical(path: str, intensities: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI file in RAS+ orientation; returns (array, affine): float32 for ``intensities``, else the
    stored (scaled) values, so a uint8 mask stays uint8. Reading the voxels here is what exposes a truncated file,
    since nibabel only reads the header on ``load``."""
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = img.get_fdata(dtype=np.float32) if intensities else np.asanyarray(img.dataobj)
    except _READ_ERRORS as e:
        raise DataError(path, f"unreadable NIfTI file (truncated or corrupt?): {e}") from e
    if data.ndim != 3:
        raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
    return data, img.affine


def load_abdomenct_case(
    image_path: str | os.PathLike, label_path: str | os.PathLike, label_map: str | Mapping[int, int] | None = None
) -> dict[str, Any]:
    """Read and check one image/mask pair.

    Args:
        image_path: CT volume in Hounsfield units.
        label_path: its mask on the same voxel grid.
        label_map: ``{source_id: target_id}`` (or a preset name) applied to the mask, unmapped ids -> 0; ``None``
            when the mask already uses the AbdomenCT-1K ids.

    Returns:
        ``{"image": float32 HU [X, Y, Z], "label": uint8 [X, Y, Z], "spacing": (x, y, z) mm, "affine": 4x4}``,
        in RAS+ orientation.

    Raises:
        DataError: a file is unreadable, the two grids differ (shape, voxel size or position beyond 1e-3), or the
            (remapped) mask holds values other than the AbdomenCT-1K classes 0..4. The message names the file.
    """
    image_path, label_path = os.fspath(image_path), os.fspath(label_path)
    image, affine = _load_canonical(image_path, intensities=True)
    label, label_affine = _load_canonical(label_path, intensities=False)
    if label.dtype.kind == "u" and label.dtype != np.uint8:  # torch, used by the range check, lacks wide unsigned ops
        label = label.astype(np.int64)
    if label.shape != image.shape:
        raise DataError(label_path, f"mask shape {label.shape} differs from image shape {image.shape} ({image_path})")
    spacing, label_spacing = nib.affines.voxel_sizes(affine), nib.affines.voxel_sizes(label_affine)
    if not np.allclose(spacing, label_spacing, rtol=0.0, atol=_GEOMETRY_ATOL):
        raise DataError(
            label_path,
            f"mask voxel size {label_spacing.tolist()} mm differs from image {spacing.tolist()} mm ({image_path})",
        )
    if not np.allclose(affine, label_affine, rtol=0.0, atol=_GEOMETRY_ATOL):
        raise DataError(label_path, f"mask affine differs from the image's ({image_path}): they are not on one grid")
    mapping = resolve_label_map(label_map)
    if mapping is not None:
        label = RemapLabels(mapping)(label, source=label_path)
    try:
        CheckLabelRange(len(ABDOMENCT_CLASS_NAMES))(label, source=label_path)
    except DataError as e:
        hint = f" after remapping with {mapping}" if mapping else "; pass label_map to remap other label ids"
        raise DataError(e.path, f"{e.problem}{hint}") from e
    return {"image": image, "label": label.astype(np.uint8), "spacing": tuple(spacing.tolist()), "affine": affine}


def to_axial_stack(volume: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A RAS+ volume [X, Y, Z] as a stack of axial slices [S, H, W] in radiological view (rows anterior -> posterior,
    columns patient right -> left), with its voxel size (mm) reordered to [S, H, W]."""
    stack = np.ascontiguousarray(volume[::-1, ::-1, :].transpose(2, 1, 0))
    return stack, (float(spacing[2]), float(spacing[1]), float(spacing[0]))


def axial_slices(
    image: np.ndarray, spacing: Sequence[float], label: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Cut a RAS+ volume [X, Y, Z] (and its mask) into axial 2D slices in radiological view.

    Returns:
        one ``{"image": [H, W], "label": [H, W] (when given), "spacing": (H, W) mm, "slice_index": k}`` per slice,
        ``k`` counting from the most inferior slice (0).
    """
    stack, stack_spacing = to_axial_stack(image, spacing)
    labels = None if label is None else to_axial_stack(label, spacing)[0]
    slices = []
    for k in range(stack.shape[0]):
        item: dict[str, Any] = {"image": stack[k], "spacing": stack_spacing[1:], "slice_index": k}
        if labels is not None:
            item["label"] = labels[k]
        slices.append(item)
    return slices


def axial_part_bounds(n_slices: int, parts: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``parts`` contiguous, nearly equal ranges of axial slice indices covering
    ``0 .. n_slices - 1`` from inferior to superior (the first ``n_slices % parts`` ranges are one slice longer)."""
    if parts < 1 or n_slices < parts:
        raise ValueError(f"cannot cut {n_slices} slices into {parts} axial parts")
    size, extra = divmod(n_slices, parts)
    bounds, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Write one SSL4MIS-style HDF5 file (gzip-compressed like the ACDC release) atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image.astype(np.float32), compression="gzip")
        f.create_dataset("label", data=label.astype(np.uint8), compression="gzip")
        for key, value in attrs.items():
            f.attrs[key] = value


def _count_of_fraction(fraction: float, total: int) -> int:
    """``ceil(fraction * total)`` robust to float error (0.07 * 100 is 7.000000000000001, which must stay 7)."""
    return math.ceil(round(fraction * total, 9))


def _split_off(
    cases: list[str], chosen: Sequence[str] | None, fraction: float, rng: random.Random, what: str, source: Path
) -> list[str]:
    """Cases of a held-out split: the ``chosen`` ids, or ``fraction`` of ``cases`` (rounded up) drawn with ``rng``."""
    if chosen is not None:
        unknown = sorted(set(chosen) - set(cases))
        if unknown:
            raise DataError(source, f"{what} cases {unknown} are not among the cases to convert")
        return sorted(set(chosen))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what}_fraction must lie in [0, 1), got {fraction}")
    return sorted(rng.sample(cases, _count_of_fraction(fraction, len(cases))))


def convert_abdomenct_to_slices(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_dir: str | os.PathLike | None = None,
    label_map: str | Mapping[int, int] | None = None,
    hu_window: Sequence[float] = ABDOMENCT_HU_WINDOW,
    cases: Sequence[str] | None = None,
    keep_empty_slices: bool = True,
    val_cases: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_cases: Sequence[str] | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    image_suffix: str = ABDOMENCT_IMAGE_SUFFIX,
    label_suffix: str = ABDOMENCT_LABEL_SUFFIX,
    axial_parts: int = 1,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Convert an AbdomenCT-1K style release to the SSL4MIS slice layout (see the module docstring).

    Every case is read and checked before anything is written, so bad input leaves ``out_dir`` untouched; each
    file is then written atomically. Training cases become slices (listed in ``train_slices.list``), validation and
    test cases become whole volumes (``val.list``, ``test.list``).

    Args:
        image_dir: folder of ``<case>_0000.nii.gz`` CT volumes (Hounsfield units).
        out_dir: output root.
        label_dir: folder of ``<case>.nii.gz`` masks (default: ``image_dir``).
        label_map: ``{source_id: target_id}`` or a preset name (``"totalsegmentator"``) for masks in another label
            convention; unmapped ids become background. ``None``: masks already use the AbdomenCT-1K ids 0..4.
        hu_window: Hounsfield window ``(low, high)`` mapped to [0, 1] with clipping.
        cases: case ids to convert (default: all).
        keep_empty_slices: also write training slices whose mask has no foreground (the SSL4MIS ACDC release keeps
            every slice); volumes always keep every slice.
        val_cases: validation case ids; overrides ``val_fraction``.
        val_fraction: share of the cases held out for validation (rounded up), drawn with ``seed``.
        test_cases: test case ids; overrides ``test_fraction``.
        test_fraction: share of the cases held out for testing (rounded up), drawn with ``seed``; ``test.list`` is
            written only when there are test cases.
        seed: seed of the random splits.
        image_suffix: how image file names end (see :func:`find_abdomenct_cases`).
        label_suffix: how mask file names end.
        axial_parts: cut every case into this many contiguous axial slabs ``<case>_part<k>`` (``k`` from 0,
            inferior to superior), which the splits (and ``val_cases`` / ``test_cases``) treat as separate cases.
            1 (the default) keeps whole cases.
        progress: show progress bars over the cases (``None``: when stderr is a terminal).

    Returns:
        ``{"train": [case ids], "validation": [...], "test": [...], "num_train_slices": n}``.

    Raises:
        DataError: an input file is missing, unreadable, or inconsistent (see :func:`load_abdomenct_case`), a
            requested case is unknown, a case has fewer axial slices than ``axial_parts``, or no training case is
            left.
    """
    out_dir = Path(out_dir)
    mapping = resolve_label_map(label_map)
    window = hu_window_transform(hu_window)
    if int(axial_parts) < 1:
        raise ValueError(f"axial_parts must be at least 1, got {axial_parts}")
    axial_parts = int(axial_parts)
    pairs = find_abdomenct_cases(image_dir, label_dir, cases, image_suffix=image_suffix, label_suffix=label_suffix)

    def part_ids(case: str) -> list[str]:
        return [case] if axial_parts == 1 else [f"{case}_part{k}" for k in range(axial_parts)]

    case_ids = [part for p in pairs for part in part_ids(p["case"])]
    rng = random.Random(seed)
    val = _split_off(case_ids, val_cases, val_fraction, rng, "val", Path(image_dir))
    if test_cases is not None and set(test_cases) & set(val):
        raise DataError(Path(image_dir), f"cases {sorted(set(test_cases) & set(val))} are both validation and test")
    remaining = [c for c in case_ids if c not in val]
    test = _split_off(remaining, test_cases, test_fraction, rng, "test", Path(image_dir))
    train = [c for c in remaining if c not in test]
    if not train:
        raise DataError(Path(image_dir), f"no training case left after holding out {len(val)} val and {len(test)} test")

    # first pass: validate everything (volumes are read again below, rather than held in memory, since a full
    # release does not fit)
    for pair in progress_bar(pairs, progress, desc="checking CT cases", unit="case"):
        checked = load_abdomenct_case(pair["image"], pair["label"], mapping)
        if checked["image"].shape[2] < axial_parts:
            raise DataError(
                pair["image"], f"{checked['image'].shape[2]} axial slices cannot be cut into {axial_parts} parts"
            )

    slice_names = []
    for pair in progress_bar(pairs, progress, desc="converting CT cases", unit="case"):
        case = load_abdomenct_case(pair["image"], pair["label"], mapping)
        image = convert_to_numpy(window(case["image"]), dtype=np.float32)
        source = Path(pair["image"]).name
        slices = axial_slices(image, case["spacing"], case["label"])
        bounds = [(0, len(slices))] if axial_parts == 1 else axial_part_bounds(len(slices), axial_parts)
        for part, (start, stop) in zip(part_ids(pair["case"]), bounds):
            if part in train:
                for item in slices[start:stop]:
                    if not keep_empty_slices and not item["label"].any():
                        continue
                    name = f"{part}_slice_{item['slice_index']}"
                    attrs = {"spacing": item["spacing"], "slice_index": item["slice_index"], "source": source}
                    _write_h5(out_dir / "data" / "slices" / f"{name}.h5", item["image"], item["label"], attrs)
                    slice_names.append(name)
            else:
                stack, stack_spacing = to_axial_stack(image, case["spacing"])
                label_stack, _ = to_axial_stack(case["label"], case["spacing"])
                attrs = {"spacing": stack_spacing, "source": source, "first_slice_index": start}
                _write_h5(out_dir / "data" / f"{part}.h5", stack[start:stop], label_stack[start:stop], attrs)

    write_text(out_dir / "train_slices.list", "".join(f"{n}\n" for n in slice_names))
    write_text(out_dir / "val.list", "".join(f"{c}\n" for c in val))
    if test:
        write_text(out_dir / "test.list", "".join(f"{c}\n" for c in test))
    summary = {"train": train, "validation": val, "test": test, "num_train_slices": len(slice_names)}
    write_json(
        out_dir / "conversion.json",
        {
            **summary,
            "class_names": list(ABDOMENCT_CLASS_NAMES),
            "hu_window": [float(v) for v in hu_window],
            "label_map": None if mapping is None else {str(k): v for k, v in mapping.items()},
            "keep_empty_slices": keep_empty_slices,
            "seed": seed,
            "image_suffix": image_suffix,
            "label_suffix": label_suffix,
            "axial_parts": axial_parts,
        },
    )
    return summary


def make_abdomenct_datalist(
    root: str | os.PathLike,
    labeled_fraction: float = 0.05,
    labeled_cases: int | str | Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The datalist of a root written by :func:`convert_abdomenct_to_slices`, split into labelled and unlabelled
    training cases (never by slice, so no case is on both sides).

    Args:
        root: converted data root.
        labeled_fraction: share of the training cases that are labelled, in (0, 1]; rounded up, so at least one.
        labeled_cases: overrides ``labeled_fraction``: labelled case ids (a list, or a comma-separated string), a
            count ``n`` (the first ``n`` cases of ``train_slices.list``) or a percentage ``"5%"``; see
            :func:`vessa_components.data.parse_labeled_cases`.
        seed: seed of the draw of labelled cases.

    Returns:
        ``{"labeled": [...], "unlabeled": [...], "validation": [...], "labeled_patients": [...]}``; entries are
        ``{"image": abs path, "label": abs path, "patient": case id, "name": ...}`` (slice files for training, the
        ``val.list`` volume files for validation); unlabelled entries carry no ``label``.

    Raises:
        DataError: a labelled case is not a training case, or a split (labelled, validation, or unlabelled when
            ``labeled_fraction < 1``) is empty.
    """
    root = Path(root).resolve()
    train_list = root / "train_slices.list"
    by_fraction = labeled_cases is None
    if by_fraction:
        if not 0.0 < labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction must lie in (0, 1], got {labeled_fraction}")
        training_cases = list(dict.fromkeys(case_of(n) for n in read_list_file(train_list)))
        count = _count_of_fraction(labeled_fraction, len(training_cases))
        labeled_cases = sorted(random.Random(seed).sample(training_cases, count))
    elif isinstance(labeled_cases, str) and not labeled_cases.strip() or (
        not isinstance(labeled_cases, (str, int, float)) and not labeled_cases
    ):
        raise DataError(train_list, "labeled_cases is empty: the labelled split would be empty")
    if not isinstance(labeled_cases, (str, int, float)):
        labeled_cases = list(labeled_cases)
    datalist = make_slice_datalist(root, labeled_cases=labeled_cases, seed=seed)
    if by_fraction and labeled_fraction < 1.0 and not datalist["unlabeled"]:
        raise DataError(train_list, f"no unlabelled training case left after labelling {datalist['labeled_patients']}")
    return datalist
