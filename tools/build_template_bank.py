"""Build a template bank from the labelled slices of a datalist and save it to a folder.

The embeddings come from the thumbnail encoder (:func:`vessa_components.templates.thumbnail_embedding`); a bank for a
trained VESSA model is re-embedded with its image encoder (``TemplateBank.embed``).

Example::

    python tools/build_template_bank.py --datalist datalist.json --out template_bank --dataset acdc --modality MRI \\
        --class_names background,right_ventricle,myocardium,left_ventricle --image_size 128
"""

from __future__ import annotations

import fire
from monai.data import load_decathlon_datalist

from vessa_components.data import DataError
from vessa_components.templates import TemplateBank
from vessa_components.utils import show_progress


def main(
    datalist: str,
    out: str,
    dataset: str,
    modality: str,
    class_names: str | tuple[str, ...],
    image_size: int = 128,
    position_weight: float = 0.0,
    phase_weight: float = 0.0,
    key: str = "labeled",
) -> None:
    """Build the bank of ``datalist[key]`` and save it to ``out``.

    Args:
        datalist: datalist JSON (e.g. from ``tools/make_datalist.py``); relative paths are relative to its folder.
        out: output folder of the bank (``index.json`` + ``tensors.safetensors``).
        dataset: data set name recorded with every exemplar, e.g. ``acdc``.
        modality: imaging modality as the text prompt names it, e.g. ``MRI`` or ``CT``.
        class_names: comma-separated class names, index = label value, background first.
        image_size: side in pixels of the stored slices.
        position_weight: weight of the relative slice position in matching.
        phase_weight: weight of the same cardiac phase in matching.
        key: the datalist section holding the labelled slices.
    """
    names = (
        class_names.split(",") if isinstance(class_names, str) else list(class_names)
    )  # fire parses "a,b" as a tuple
    try:
        entries = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=key)
    except (ValueError, TypeError) as e:  # missing file, no such key, or entries that are not dicts
        raise DataError(datalist, f"not a datalist with a '{key}' list of entries: {e}") from e
    bank = TemplateBank.from_datalist(
        entries,
        dataset,
        modality,
        [name.strip() for name in names],
        image_size=image_size,
        position_weight=position_weight,
        phase_weight=phase_weight,
        progress=show_progress(),  # a bar in a terminal, nothing in a log file
    )
    bank.save(out)
    patients = sorted({e.patient for e in bank.exemplars})
    print(f"{out}: {len(bank)} exemplars of {len(patients)} patients ({', '.join(patients)}), {bank.image_size} px")


if __name__ == "__main__":
    fire.Fire(main)
