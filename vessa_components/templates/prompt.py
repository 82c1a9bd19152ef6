"""The text half of a VESSA prompt: the instruction that refers to the target image and the template overlay, and the
teacher-forced answer whose ``<SEG>`` token carries the segmentation query.

The model sees image 1 (the target slice), image 2 (the template overlay, see
:class:`vessa_components.transforms.overlay.TemplateOverlayd`) and :func:`build_prompt`'s text, and is trained to answer
:data:`DEFAULT_ANSWER`; the last hidden state at :data:`SEG_TOKEN` becomes the prompt embedding of the mask decoder.
"""

from __future__ import annotations

import string

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_ANSWER",
    "SEG_TOKEN",
    "PROMPT_FIELDS",
    "readable_class_name",
    "build_prompt",
]

#: the special token whose last hidden state is projected to the mask decoder's prompt embedding
SEG_TOKEN = "<SEG>"
#: instruction text; ``{modality}`` and ``{class}`` are filled by :func:`build_prompt`
DEFAULT_PROMPT_TEMPLATE = (
    "Image 1 is a {modality} slice. Image 2 shows a reference {modality} slice with the {class} outlined. "
    "Segment the {class} in image 1."
)
#: the answer used for teacher forcing (no generation is needed to read the ``<SEG>`` state)
DEFAULT_ANSWER = f"Sure, {SEG_TOKEN}."
#: the placeholders a prompt template may use
PROMPT_FIELDS: tuple[str, ...] = ("modality", "class")


def readable_class_name(class_name: str) -> str:
    """The class name as words for the text prompt (``left_ventricle`` -> ``left ventricle``)."""
    return " ".join(class_name.replace("_", " ").split())


def build_prompt(class_name: str, modality: str, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """Fill a prompt template for one class of one modality.

    Args:
        class_name: the class to segment, as in a data set's class names (underscores become spaces).
        modality: the imaging modality as it should read in the text, e.g. ``"MRI"`` or ``"CT"``.
        template: text with ``{modality}`` and / or ``{class}`` placeholders (``{{`` and ``}}`` for literal braces).

    Raises:
        ValueError: the template is malformed or uses a placeholder other than :data:`PROMPT_FIELDS`.
    """
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ValueError(f"malformed prompt template {template!r}: {e}") from e
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown:
        raise ValueError(
            f"prompt template {template!r} uses unknown placeholder(s) {unknown}; allowed: "
            + ", ".join("{" + f + "}" for f in PROMPT_FIELDS)
        )
    return template.format_map({"modality": modality, "class": readable_class_name(class_name)})
