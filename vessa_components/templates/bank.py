"""The template bank: labelled exemplar slices, their embeddings by a frozen image encoder, and nearest-exemplar
matching (step 1 of a VESSA forward pass: pick the reference slice whose mask shows the model what to segment).

Each exemplar is a 2D slice resized to ``image_size`` x ``image_size`` (float32 [1, S, S] in [0, 1]), its label map
(uint8 [S, S], label value = index in its data set's class names, background 0) and a few cheap cues: the relative
position of the slice in its stack (0 first .. 1 last) and the cardiac phase (``"ED"`` / ``"ES"``).

Embeddings come from an injectable encoder ``embed_fn``: a batch [B, 1, S, S] in [0, 1] -> [B, D]; the bank
L2-normalises and stores them, so matching is one matrix product of cosine similarities. Without an encoder the bank
uses :func:`thumbnail_embedding` (no network). The encoder is expected to move its input to its own device; the bank
keeps everything on the CPU.

On disk (:meth:`TemplateBank.save`): ``tensors.safetensors`` (``images``, ``labels`` and, when computed,
``embeddings``) and ``index.json`` (format version, image size, cue weights, encoder name, embedding size, the data
sets with their modality and class names, one metadata record per exemplar, and the SHA-256 of the tensor file).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.config.type_definitions import NdarrayOrTensor
from monai.utils import convert_to_numpy, convert_to_tensor
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..data.datalist import case_of
from ..data.errors import DataError
from ..data.h5 import LoadH5d
from ..utils.io import atomic_path, write_json

__all__ = [
    "BANK_FORMAT_VERSION",
    "ACDC_FRAME_PHASES",
    "THUMBNAIL_ENCODER_NAME",
    "EmbedFn",
    "Exemplar",
    "TemplateMatch",
    "TemplateBank",
    "slice_cues",
    "thumbnail_embedding",
]

#: version of the on-disk layout written by :meth:`TemplateBank.save`
BANK_FORMAT_VERSION = 1
#: frame number -> cardiac phase in the SSL4MIS ACDC release (and in our converter's output)
ACDC_FRAME_PHASES: dict[int, str] = {1: "ED", 2: "ES"}
#: name recorded for :func:`thumbnail_embedding`, the encoder used when none is given
THUMBNAIL_ENCODER_NAME = "thumbnail_16x16_centred"

#: an image encoder: batch [B, 1, S, S] with intensities in [0, 1] -> embeddings [B, D]
EmbedFn = Callable[[torch.Tensor], torch.Tensor]

_INDEX_FILE = "index.json"
_TENSORS_FILE = "tensors.safetensors"
_SLICE_RE = re.compile(r"^(?P<stack>.+)_slice_(?P<index>\d+)$")
_FRAME_RE = re.compile(r"_frame(?P<frame>\d+)")
_T = TypeVar("_T")


def thumbnail_embedding(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """The encoder used when none is given: each image area-averaged to ``size`` x ``size``, flattened and centred.

    After L2 normalisation the cosine similarity of two such embeddings is the Pearson correlation of the two
    thumbnails: deterministic, free of any network, and blind to brightness offset and contrast scale.

    Args:
        images: batch [B, 1, H, W].

    Returns:
        [B, size * size] float32.
    """
    thumbnails = F.adaptive_avg_pool2d(images.float(), size).flatten(1)
    return thumbnails - thumbnails.mean(dim=1, keepdim=True)


def slice_cues(
    names: Sequence[str], frame_phases: Mapping[int, str] = ACDC_FRAME_PHASES
) -> list[tuple[float | None, str | None]]:
    """The matching cues of slices named like ``patient099_frame01_slice_3`` or ``Case_00001_slice_40``.

    The relative position is ``(K - K_min) / (K_max - K_min)`` over the slices of the same stack (the name without
    ``_slice_K``) among ``names``, so the first listed slice is 0 and the last 1 whether the release counts slices from
    0 or 1; it is ``None`` for a name without ``_slice_K`` or a stack with one slice. The phase is
    ``frame_phases[YY]`` of ``_frameYY`` (``None`` when absent or unmapped).

    Returns:
        one ``(relative_position, phase)`` per name, in order.
    """
    parsed = [_SLICE_RE.match(name) for name in names]
    ranges: dict[str, tuple[int, int]] = {}
    for match in parsed:
        if match is not None:
            index = int(match["index"])
            low, high = ranges.get(match["stack"], (index, index))
            ranges[match["stack"]] = (min(low, index), max(high, index))
    cues: list[tuple[float | None, str | None]] = []
    for name, match in zip(names, parsed):
        position = None
        if match is not None:
            low, high = ranges[match["stack"]]
            position = (int(match["index"]) - low) / (high - low) if high > low else None
        frame = _FRAME_RE.search(name)
        cues.append((position, None if frame is None else frame_phases.get(int(frame["frame"]))))
    return cues


@dataclass(frozen=True)
class Exemplar:
    """Metadata of one exemplar of a :class:`TemplateBank`.

    Attributes:
        dataset: name of its data set (which fixes the modality and the class names).
        patient: patient / case id; matching can exclude it so the template comes from another patient.
        name: slice name, e.g. ``patient099_frame01_slice_3``.
        relative_position: position of the slice in its stack, 0 (first) .. 1 (last), or ``None`` when unknown.
        phase: acquisition phase such as ``"ED"`` or ``"ES"``, or ``None``.
    """

    dataset: str
    patient: str
    name: str = ""
    relative_position: float | None = None
    phase: str | None = None


@dataclass(frozen=True)
class TemplateMatch:
    """One exemplar chosen for a query slice and a class.

    Attributes:
        index: position of the exemplar in the bank.
        score: cosine similarity of the embeddings plus the weighted cue terms (higher is more similar).
        image: the exemplar image, float32 [1, S, S] in [0, 1].
        mask: its binary mask of the class, float32 [1, S, S] of 0 / 1.
        patient: the exemplar's patient id.
        dataset: the exemplar's data set.
        name: the exemplar's slice name.
        class_name: the class the mask shows.
    """

    index: int
    score: float
    image: torch.Tensor
    mask: torch.Tensor
    patient: str
    dataset: str
    name: str
    class_name: str


@dataclass(frozen=True)
class _Columns:
    """The exemplars as stacked tensors for vectorised matching (rebuilt after every :meth:`TemplateBank.add`)."""

    images: torch.Tensor  # [N, 1, S, S] float32
    labels: torch.Tensor  # [N, S, S] uint8
    present: torch.Tensor  # [N, L] bool: label value l occurs in exemplar n
    dataset_codes: torch.Tensor  # [N] int64, index into TemplateBank.datasets()
    patient_codes: torch.Tensor  # [N] int64, index into patients
    phase_codes: torch.Tensor  # [N] int64, index into phases, -1 when unknown
    positions: torch.Tensor  # [N] float32, NaN when unknown
    patients: dict[str, int]
    phases: dict[str, int]


def _per_item(value: _T | Sequence[_T] | None, count: int, what: str) -> list[_T | None]:
    """Broadcast a per-query argument: one value (or ``None``) for all queries, or a sequence with one per query."""
    if value is None or isinstance(value, (str, int, float)):
        return [value] * count  # type: ignore[list-item]
    values = list(value)  # type: ignore[arg-type]
    if len(values) != count:
        raise ValueError(f"{what}: expected one value or {count} (one per image), got {len(values)}")
    return values


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TemplateBank:
    """Labelled exemplar slices of one or more data sets, matched to query slices by embedding similarity.

    The score of exemplar ``e`` for query ``q`` is::

        cos(emb(q), emb(e)) + position_weight * (1 - |pos(q) - pos(e)|) + phase_weight * [phase(q) == phase(e)]

    where a cue term is 0 when either side does not know the cue.

    Args:
        image_size: side S in pixels of the stored images and label maps (and of the images given to the encoder).
        embed_fn: frozen image encoder [B, 1, S, S] -> [B, D]; default :func:`thumbnail_embedding`.
        encoder_name: name recorded in the saved index for ``embed_fn`` (default: its qualified name).
        position_weight: weight of the relative-position cue (0 ignores it).
        phase_weight: weight of the same-phase cue (0 ignores it).

    Example::

        bank = TemplateBank.from_datalist(datalist["labeled"], "acdc", "MRI", ACDC_CLASS_NAMES, image_size=128)
        best = bank.match(slice_image, "left_ventricle", exclude_patient="patient099")[0]
        best.image, best.mask  # [1, 128, 128] each
    """

    def __init__(
        self,
        image_size: int = 128,
        embed_fn: EmbedFn | None = None,
        encoder_name: str | None = None,
        position_weight: float = 0.0,
        phase_weight: float = 0.0,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = int(image_size)
        self.position_weight = float(position_weight)
        self.phase_weight = float(phase_weight)
        #: the encoder of the stored embeddings; ``None`` after :meth:`load` of a bank made by an encoder not given
        self.embed_fn: EmbedFn | None = thumbnail_embedding if embed_fn is None else embed_fn
        self.encoder_name = self._encoder_name(embed_fn, encoder_name)
        #: one metadata record per exemplar, in bank order
        self.exemplars: list[Exemplar] = []
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._modalities: dict[str, str] = {}
        self._class_names: dict[str, tuple[str, ...]] = {}
        self._embeddings: torch.Tensor | None = None  # [N, D], None when missing or stale
        self._columns_cache: _Columns | None = None

    # ------------------------------------------------------------------ contents

    def __len__(self) -> int:
        return len(self.exemplars)

    def datasets(self) -> list[str]:
        """Names of the registered data sets, in registration order."""
        return list(self._class_names)

    def classes(self, dataset: str | None = None) -> list[str]:
        """Class names of ``dataset`` (index = label value), or of all data sets (each name once, in order)."""
        if dataset is not None:
            return list(self._class_names[self._check_dataset(dataset)])
        return list(dict.fromkeys(name for names in self._class_names.values() for name in names))

    def foreground_classes(self) -> list[str]:
        """The foreground classes of all data sets (each name once, in registration order), the classes a VESSA model
        using this bank is prompted with (background, the first class of each data set, left out)."""
        return list(dict.fromkeys(name for names in self._class_names.values() for name in names[1:]))

    def modality(self, dataset: str) -> str:
        """Imaging modality of ``dataset`` (e.g. ``"MRI"``), as the text prompt names it."""
        return self._modalities[self._check_dataset(dataset)]

    @property
    def images(self) -> torch.Tensor:
        """The exemplar images [N, 1, S, S], float32 in [0, 1], in bank order (shared storage: do not modify)."""
        return self._columns().images

    @property
    def labels(self) -> torch.Tensor:
        """The exemplar label maps [N, S, S], uint8, in bank order (shared storage: do not modify)."""
        return self._columns().labels

    @property
    def embeddings(self) -> torch.Tensor | None:
        """L2-normalised embeddings [N, D] of the exemplars, or ``None`` when missing or stale."""
        return self._embeddings

    def add_dataset(self, dataset: str, modality: str, class_names: Sequence[str]) -> None:
        """Register a data set; registering it again with the same modality and class names does nothing.

        Args:
            dataset: data set name, e.g. ``"acdc"``.
            modality: imaging modality as the text prompt names it, e.g. ``"MRI"``.
            class_names: class names, index = label value, background first.
        """
        names = tuple(class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"data set '{dataset}' needs distinct class names, background first; got {list(names)}")
        if dataset in self._class_names and (self._modalities[dataset], self._class_names[dataset]) != (
            modality,
            names,
        ):
            raise ValueError(
                f"data set '{dataset}' is already registered as {self._modalities[dataset]} with classes "
                f"{list(self._class_names[dataset])}, not {modality} with {list(names)}"
            )
        self._modalities[dataset] = modality
        self._class_names[dataset] = names

    def add(
        self,
        image: NdarrayOrTensor,
        label: NdarrayOrTensor,
        dataset: str,
        patient: str,
        name: str = "",
        relative_position: float | None = None,
        phase: str | None = None,
    ) -> int:
        """Add one exemplar of a registered data set (see :meth:`add_dataset`); returns its index.

        Args:
            image: slice [H, W] or [1, H, W] with intensities in [0, 1]; resized bilinearly (antialiased) to S x S.
            label: its label map of the same size; resized with nearest-neighbour interpolation.
            dataset, patient, name, relative_position, phase: see :class:`Exemplar`.

        Raises:
            ValueError: unregistered data set, wrong shapes, intensities outside [0, 1], label values without a
                class name, or a relative position outside [0, 1].
        """
        self._check_dataset(dataset)
        # checked in numpy: on a busy CPU each small torch reduction pays a thread-pool round trip
        image_np = convert_to_numpy(image, dtype=np.float32)
        label_np = convert_to_numpy(label)
        image_np = image_np[None] if image_np.ndim == 2 else image_np
        label_np = label_np[None] if label_np.ndim == 2 else label_np
        if image_np.ndim != 3 or image_np.shape[0] != 1 or label_np.shape != image_np.shape:
            raise ValueError(
                f"expected a 2D slice and its label map ([H, W] or [1, H, W], same size), got image "
                f"{tuple(image_np.shape)} and label {tuple(label_np.shape)}"
            )
        low, high = float(image_np.min()), float(image_np.max())
        if low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(f"image intensities span [{low:.4g}, {high:.4g}]; normalise the slice to [0, 1] first")
        num_classes = len(self._class_names[dataset])
        label_low, label_high = float(label_np.min()), float(label_np.max())
        integral = np.issubdtype(label_np.dtype, np.integer) or np.array_equal(label_np, np.round(label_np))
        if label_low < 0 or label_high >= num_classes or not integral:
            raise ValueError(
                f"label values (range [{label_low:g}, {label_high:g}]) are not all class indices of '{dataset}' "
                f"(0..{num_classes - 1}: {list(self._class_names[dataset])})"
            )
        if relative_position is not None and not 0.0 <= relative_position <= 1.0:
            raise ValueError(f"relative_position must be in [0, 1] or None, got {relative_position}")
        self._images.append(self._resize(torch.from_numpy(image_np)[None])[0])
        label_t = torch.from_numpy(label_np.astype(np.float32))[None]
        self._labels.append(F.interpolate(label_t, self._size, mode="nearest-exact")[0, 0].to(torch.uint8))
        self.exemplars.append(Exemplar(dataset, patient, name, relative_position, phase))
        self._embeddings = None
        self._columns_cache = None
        return len(self.exemplars) - 1

    def add_datalist(
        self,
        entries: Sequence[Mapping[str, Any]],
        dataset: str,
        modality: str,
        class_names: Sequence[str],
        frame_phases: Mapping[int, str] = ACDC_FRAME_PHASES,
        progress: bool = False,
    ) -> int:
        """Add the slices of datalist entries ``{"image": h5, "label": h5, "patient": id, "name": slice name}``.

        Files are read with :class:`vessa_components.data.LoadH5d` (SSL4MIS slice layout). ``name`` defaults to the
        image file's stem and ``patient`` to the name without ``_frameYY`` / ``_slice_K``; the cues come from
        :func:`slice_cues` over the names of ``entries``.

        Args:
            entries: datalist entries of labelled slices.
            dataset, modality, class_names: see :meth:`add_dataset`.
            frame_phases: frame number -> phase name.
            progress: show a tqdm progress bar.

        Returns:
            the number of exemplars added.

        Raises:
            DataError: an entry without a label, a file that cannot be read, a volume instead of a slice, intensities
                outside [0, 1] or label values without a class name; the message names the file.
        """
        self.add_dataset(dataset, modality, class_names)
        names = [str(e.get("name") or Path(e["image"]).name.removesuffix(".h5")) for e in entries]
        loader = LoadH5d(keys=["image", "label"], dtypes=[np.float32, np.uint8])
        for entry, name, (position, phase) in tqdm(
            list(zip(entries, names, slice_cues(names, frame_phases))),
            desc=f"template bank {dataset}",
            disable=not progress,
        ):
            if "label" not in entry:
                raise DataError(
                    entry["image"], "datalist entry has no 'label': the template bank needs labelled slices"
                )
            data = loader({"image": entry["image"], "label": entry["label"]})
            try:
                self.add(
                    data["image"], data["label"], dataset, entry.get("patient") or case_of(name), name, position, phase
                )
            except ValueError as e:
                label_file = "" if entry["label"] == entry["image"] else f" (label file {entry['label']})"
                raise DataError(entry["image"], f"{e}{label_file}") from e
        return len(entries)

    @classmethod
    def from_datalist(
        cls,
        entries: Sequence[Mapping[str, Any]],
        dataset: str,
        modality: str,
        class_names: Sequence[str],
        image_size: int = 128,
        embed_fn: EmbedFn | None = None,
        encoder_name: str | None = None,
        position_weight: float = 0.0,
        phase_weight: float = 0.0,
        frame_phases: Mapping[int, str] = ACDC_FRAME_PHASES,
        progress: bool = False,
    ) -> TemplateBank:
        """A bank of one data set's labelled slices (see :meth:`add_datalist`), embedded with ``embed_fn``."""
        bank = cls(image_size, embed_fn, encoder_name, position_weight, phase_weight)
        bank.add_datalist(entries, dataset, modality, class_names, frame_phases=frame_phases, progress=progress)
        bank.embed()
        return bank

    @classmethod
    def from_datasets(
        cls,
        datasets: Sequence[Mapping[str, Any]],
        image_size: int = 128,
        embed_fn: EmbedFn | None = None,
        encoder_name: str | None = None,
        position_weight: float = 0.0,
        phase_weight: float = 0.0,
        progress: bool = False,
    ) -> TemplateBank:
        """A bank of the labelled slices of several data sets, as :func:`vessa_components.data.stage1.resolve_datasets`
        returns them (``name``, ``modality``, ``class_names``, ``labeled`` each), embedded with ``embed_fn``."""
        bank = cls(image_size, embed_fn, encoder_name, position_weight, phase_weight)
        for dataset in datasets:
            bank.add_datalist(
                dataset["labeled"], dataset["name"], dataset["modality"], dataset["class_names"], progress=progress
            )
        bank.embed()
        return bank

    # ------------------------------------------------------------------ embeddings

    def embed(
        self, embed_fn: EmbedFn | None = None, batch_size: int = 32, encoder_name: str | None = None
    ) -> torch.Tensor:
        """(Re)compute the embeddings of all exemplars, in batches, without gradients.

        Call it whenever the encoder's weights change (e.g. on a schedule during Stage-1 training).

        Args:
            embed_fn: the encoder to use and remember; default the bank's own.
            batch_size: exemplars per encoder call.
            encoder_name: name recorded for a new ``embed_fn`` (default: its qualified name).

        Returns:
            the L2-normalised embeddings [N, D].
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        encoder = self.embed_fn if embed_fn is None else embed_fn
        if encoder is None:
            raise ValueError(
                f"no encoder known for this bank (its embeddings were made by '{self.encoder_name}'): pass embed_fn"
            )
        images = self._columns().images
        self._embeddings = torch.cat(
            [self._encode(encoder, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )
        if embed_fn is not None:
            self.embed_fn = embed_fn
            self.encoder_name = self._encoder_name(embed_fn, encoder_name)
        return self._embeddings

    # ------------------------------------------------------------------ matching

    def match(
        self,
        image: NdarrayOrTensor,
        class_name: str,
        k: int = 1,
        exclude_patient: str | None = None,
        dataset: str | None = None,
        position: float | None = None,
        phase: str | None = None,
        embed_fn: EmbedFn | None = None,
    ) -> list[TemplateMatch]:
        """The ``k`` best exemplars for one query slice and class, best first (fewer when fewer qualify).

        Args:
            image: query slice [1, H, W] (or [H, W]) in [0, 1], any size (resized to S x S for the encoder).
            class_name: class to segment; only exemplars whose mask of it is non-empty qualify.
            k: number of matches.
            exclude_patient: a patient whose exemplars do not qualify (the query's own patient in Stage 1).
            dataset: restrict to this data set's exemplars.
            position: the query's relative slice position (0..1), for the position cue.
            phase: the query's phase, for the phase cue.
            embed_fn: encoder for the query; when it differs from the bank's, the bank is re-embedded with it first.

        Raises:
            ValueError: empty bank, unknown data set or class, no qualifying exemplar, or no encoder known.
        """
        image_t = convert_to_tensor(image, dtype=torch.float32, track_meta=False)
        image_t = image_t[None] if image_t.ndim == 2 else image_t
        return self.match_batch(image_t[None], class_name, k, exclude_patient, dataset, position, phase, embed_fn)[0]

    def match_batch(
        self,
        images: NdarrayOrTensor,
        class_names: str | Sequence[str],
        k: int = 1,
        exclude_patient: str | Sequence[str | None] | None = None,
        dataset: str | Sequence[str | None] | None = None,
        positions: float | Sequence[float | None] | None = None,
        phases: str | Sequence[str | None] | None = None,
        embed_fn: EmbedFn | None = None,
        exclude_name: str | Sequence[str | None] | None = None,
    ) -> list[list[TemplateMatch]]:
        """:meth:`match` for a batch of queries: one encoder call and one matrix product for all of them.

        Args:
            images: query slices [B, 1, H, W] in [0, 1].
            class_names, exclude_patient, dataset, positions, phases: one value for all queries or one per query.
            k, embed_fn: see :meth:`match`.
            exclude_name: an exemplar (slice name) that does not qualify, one for all queries or one per query: the
                query itself when Stage 1 has a single labelled patient to draw templates from.

        Returns:
            for each query, its matches, best first.
        """
        images_t = convert_to_tensor(images, dtype=torch.float32, track_meta=False)
        if images_t.ndim != 4 or images_t.shape[1] != 1:
            raise ValueError(f"images must be a batch [B, 1, H, W], got shape {tuple(images_t.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        count = images_t.shape[0]
        query_classes = _per_item(class_names, count, "class_names")
        query_patients = _per_item(exclude_patient, count, "exclude_patient")
        query_datasets = _per_item(dataset, count, "dataset")
        query_positions = _per_item(positions, count, "positions")
        query_phases = _per_item(phases, count, "phases")
        query_names = _per_item(exclude_name, count, "exclude_name")
        columns = self._columns()
        # which exemplars qualify, per query: checked before any encoder runs so bad arguments fail fast
        allowed = torch.stack(
            [
                self._qualifying(columns, *item)
                for item in zip(query_classes, query_datasets, query_patients, query_names)
            ]
        )
        bank_embeddings = self._current_embeddings(embed_fn)
        encoder = embed_fn if embed_fn is not None else self.embed_fn
        query = self._encode(encoder, self._resize(images_t))  # type: ignore[arg-type]
        if query.shape[1] != bank_embeddings.shape[1]:
            raise ValueError(
                f"the encoder gives {query.shape[1]}-d embeddings but the bank holds {bank_embeddings.shape[1]}-d ones"
            )
        scores = query @ bank_embeddings.T + self._cue_scores(columns, query_positions, query_phases)
        top_scores, top_indices = scores.masked_fill(~allowed, -math.inf).topk(min(k, len(self)), dim=1)
        results = []
        for row_scores, row_indices, class_name in zip(top_scores.tolist(), top_indices.tolist(), query_classes):
            results.append(
                [
                    self._make_match(columns, index, score, class_name)
                    for score, index in zip(row_scores, row_indices)
                    if score > -math.inf
                ]
            )
        return results

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bank to ``directory`` (created if needed); returns the folder.

        The tensor file is written first and ``index.json`` last, each atomically; the index records the tensor file's
        SHA-256, so an interrupted overwrite is detected by :meth:`load`. Embeddings are saved when up to date.
        """
        directory = Path(directory)
        columns = self._columns()
        tensors = {"images": columns.images.contiguous(), "labels": columns.labels.contiguous()}
        if self._embeddings is not None:
            tensors["embeddings"] = self._embeddings.contiguous()
        with atomic_path(directory / _TENSORS_FILE) as tmp:
            save_file(tensors, tmp, metadata={"format_version": str(BANK_FORMAT_VERSION)})
            checksum = _sha256(tmp)
        index = {
            "format_version": BANK_FORMAT_VERSION,
            "image_size": self.image_size,
            "position_weight": self.position_weight,
            "phase_weight": self.phase_weight,
            "encoder_name": self.encoder_name,
            "embedding_dim": None if self._embeddings is None else int(self._embeddings.shape[1]),
            "datasets": {
                d: {"modality": self._modalities[d], "class_names": list(self._class_names[d])} for d in self.datasets()
            },
            "exemplars": [asdict(e) for e in self.exemplars],
            "tensors_sha256": checksum,
        }
        write_json(directory / _INDEX_FILE, index)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, embed_fn: EmbedFn | None = None) -> TemplateBank:
        """Read a bank written by :meth:`save`.

        Args:
            directory: the bank folder.
            embed_fn: the encoder that made the saved embeddings. Without it, a bank made by
                :func:`thumbnail_embedding` gets it back; any other bank keeps its stored embeddings but needs an
                encoder (passed to :meth:`match` or :meth:`embed`) to embed queries.

        Raises:
            DataError: a missing, corrupt or inconsistent ``index.json`` or tensor file (the message names it).
        """
        directory = Path(directory)
        index_path, tensors_path = directory / _INDEX_FILE, directory / _TENSORS_FILE
        if not index_path.is_file():
            raise DataError(
                index_path, "template bank index not found (not a bank folder, or its save was interrupted)"
            )
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(index_path, f"corrupt template bank index (not JSON): {e}") from e
        if not isinstance(index, dict) or index.get("format_version") != BANK_FORMAT_VERSION:
            found = index.get("format_version") if isinstance(index, dict) else None
            raise DataError(
                index_path, f"template bank format version {found!r}; this code reads {BANK_FORMAT_VERSION}"
            )
        if not tensors_path.is_file():
            raise DataError(tensors_path, "template bank tensor file not found")
        if _sha256(tensors_path) != index.get("tensors_sha256"):
            raise DataError(
                tensors_path, "content does not match the checksum in index.json (corrupt, or an interrupted save)"
            )
        try:
            tensors = load_file(tensors_path)
        except SafetensorError as e:
            raise DataError(tensors_path, f"unreadable safetensors file: {e}") from e
        try:
            bank = cls(index["image_size"], embed_fn, None, index["position_weight"], index["phase_weight"])
            bank.encoder_name = str(index["encoder_name"])
            for name, info in index["datasets"].items():
                bank.add_dataset(name, info["modality"], info["class_names"])
            exemplars = [Exemplar(**record) for record in index["exemplars"]]
            embedding_dim = index["embedding_dim"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(index_path, f"template bank index is missing or has a malformed entry: {e!r}") from e
        size, count = bank.image_size, len(exemplars)
        expected = {"images": (count, 1, size, size), "labels": (count, size, size)}
        if embedding_dim is not None:
            expected["embeddings"] = (count, embedding_dim)
        found = {key: tuple(value.shape) for key, value in tensors.items()}
        if found != expected:
            raise DataError(tensors_path, f"tensors {found} do not fit index.json, which describes {expected}")
        bank.exemplars = exemplars
        bank._images = list(tensors["images"].clone().unbind(0))
        bank._labels = list(tensors["labels"].clone().unbind(0))
        bank._embeddings = tensors["embeddings"].clone() if embedding_dim is not None else None
        if embed_fn is None and bank.encoder_name != THUMBNAIL_ENCODER_NAME:
            bank.embed_fn = None
        return bank

    # ------------------------------------------------------------------ internals

    @property
    def _size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bank and query images go through the same resampling, so a slice matched against itself scores 1."""
        if tuple(images.shape[-2:]) == self._size:
            return images.float()
        return F.interpolate(images.float(), self._size, mode="bilinear", align_corners=False, antialias=True).clamp(
            0.0, 1.0
        )

    @staticmethod
    def _encoder_name(embed_fn: EmbedFn | None, encoder_name: str | None) -> str:
        if embed_fn is None:
            return THUMBNAIL_ENCODER_NAME
        return encoder_name or getattr(embed_fn, "__qualname__", type(embed_fn).__qualname__)

    @staticmethod
    def _encode(encoder: EmbedFn, images: torch.Tensor) -> torch.Tensor:
        """Run the frozen encoder on a batch and L2-normalise its output (on the CPU, float32)."""
        with torch.no_grad():
            embeddings = encoder(images)
        if embeddings.ndim != 2 or embeddings.shape[0] != images.shape[0]:
            raise ValueError(
                f"embed_fn must map [B, 1, H, W] to [B, D]; got {tuple(embeddings.shape)} for B={images.shape[0]}"
            )
        return F.normalize(embeddings.detach().float().cpu(), dim=1)

    def _check_dataset(self, dataset: str) -> str:
        if dataset not in self._class_names:
            raise ValueError(f"unknown data set '{dataset}'; the bank holds {self.datasets()}")
        return dataset

    def _columns(self) -> _Columns:
        if not self.exemplars:
            raise ValueError("the template bank is empty: add exemplars (add, add_datalist) or load a saved bank")
        if self._columns_cache is None:
            datasets = {d: i for i, d in enumerate(self.datasets())}
            patients = {p: i for i, p in enumerate(dict.fromkeys(e.patient for e in self.exemplars))}
            phases = {p: i for i, p in enumerate(dict.fromkeys(e.phase for e in self.exemplars if e.phase is not None))}
            labels = torch.stack(self._labels)
            num_values = max(len(names) for names in self._class_names.values())
            self._columns_cache = _Columns(
                images=torch.stack(self._images),
                labels=labels,
                present=torch.stack([(labels == value).flatten(1).any(1) for value in range(num_values)], dim=1),
                dataset_codes=torch.tensor([datasets[e.dataset] for e in self.exemplars]),
                patient_codes=torch.tensor([patients[e.patient] for e in self.exemplars]),
                phase_codes=torch.tensor([-1 if e.phase is None else phases[e.phase] for e in self.exemplars]),
                positions=torch.tensor(
                    [math.nan if e.relative_position is None else e.relative_position for e in self.exemplars]
                ),
                patients=patients,
                phases=phases,
            )
        return self._columns_cache

    def _current_embeddings(self, embed_fn: EmbedFn | None) -> torch.Tensor:
        """The bank's embeddings, recomputed first when missing / stale or when a different encoder is given."""
        if embed_fn is not None and embed_fn != self.embed_fn:
            return self.embed(embed_fn)
        if self._embeddings is None:
            if self.embed_fn is None:
                raise ValueError(
                    "the bank's embeddings are missing or stale (exemplars were added after the last embed) and no "
                    f"encoder is known (they were made by '{self.encoder_name}'): call embed(embed_fn) or pass embed_fn"
                )
            return self.embed()
        if self.embed_fn is None:
            raise ValueError(
                f"no encoder to embed the query: pass the embed_fn that made this bank ('{self.encoder_name}')"
            )
        return self._embeddings

    def _qualifying(
        self,
        columns: _Columns,
        class_name: str,
        dataset: str | None,
        exclude_patient: str | None,
        exclude_name: str | None = None,
    ) -> torch.Tensor:
        """[N] bool: the exemplars (of ``dataset``, not of ``exclude_patient``, not named ``exclude_name``) with a
        non-empty ``class_name`` mask."""
        datasets = self.datasets() if dataset is None else [self._check_dataset(dataset)]
        known = [d for d in datasets if class_name in self._class_names[d]]
        if not known:
            where = f"data set '{dataset}'" if dataset is not None else "the bank's data sets"
            names = self.classes(dataset)
            raise ValueError(f"unknown class '{class_name}' for {where}; known classes: {names}")
        allowed = torch.zeros(len(self), dtype=torch.bool)
        for name in known:
            value = self._class_names[name].index(class_name)
            allowed |= (columns.dataset_codes == self.datasets().index(name)) & columns.present[:, value]
        if exclude_patient is not None and exclude_patient in columns.patients:
            allowed &= columns.patient_codes != columns.patients[exclude_patient]
        if exclude_name is not None:
            allowed &= torch.tensor([e.name != exclude_name for e in self.exemplars], dtype=torch.bool)
        if not allowed.any():
            where = f"in data set '{dataset}'" if dataset is not None else f"in data sets {known}"
            excluding = f" apart from patient '{exclude_patient}'" if exclude_patient is not None else ""
            excluding += f" apart from slice '{exclude_name}'" if exclude_name is not None else ""
            raise ValueError(f"no exemplar shows class '{class_name}' {where}{excluding}")
        return allowed

    def _cue_scores(
        self, columns: _Columns, positions: Sequence[float | None], phases: Sequence[str | None]
    ) -> torch.Tensor:
        """[B, N] weighted cue terms (0 where either side lacks the cue)."""
        cues = torch.zeros(len(positions), len(self))
        if self.position_weight:
            query = torch.tensor([math.nan if p is None else float(p) for p in positions])
            closeness = 1.0 - (query[:, None] - columns.positions[None, :]).abs()
            cues += self.position_weight * closeness.nan_to_num(0.0)
        if self.phase_weight:
            query_codes = torch.tensor([columns.phases.get(p, -2) if p is not None else -2 for p in phases])
            cues += self.phase_weight * (query_codes[:, None] == columns.phase_codes[None, :]).float()
        return cues

    def _make_match(self, columns: _Columns, index: int, score: float, class_name: str) -> TemplateMatch:
        exemplar = self.exemplars[index]
        value = self._class_names[exemplar.dataset].index(class_name)
        return TemplateMatch(
            index=index,
            score=score,
            image=columns.images[index],
            mask=(columns.labels[index] == value).float()[None],
            patient=exemplar.patient,
            dataset=exemplar.dataset,
            name=exemplar.name,
            class_name=class_name,
        )
