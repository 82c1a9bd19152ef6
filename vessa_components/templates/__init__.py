"""Template bank (labelled exemplars, embeddings, matching, save / load) and the text half of a VESSA prompt."""

from .bank import (
    ACDC_FRAME_PHASES,
    BANK_FORMAT_VERSION,
    THUMBNAIL_ENCODER_NAME,
    EmbedFn,
    Exemplar,
    TemplateBank,
    TemplateMatch,
    slice_cues,
    thumbnail_embedding,
)
from .prompt import DEFAULT_ANSWER, DEFAULT_PROMPT_TEMPLATE, PROMPT_FIELDS, SEG_TOKEN, build_prompt, readable_class_name

__all__ = [
    "ACDC_FRAME_PHASES",
    "BANK_FORMAT_VERSION",
    "THUMBNAIL_ENCODER_NAME",
    "EmbedFn",
    "Exemplar",
    "TemplateBank",
    "TemplateMatch",
    "slice_cues",
    "thumbnail_embedding",
    "DEFAULT_ANSWER",
    "DEFAULT_PROMPT_TEMPLATE",
    "PROMPT_FIELDS",
    "SEG_TOKEN",
    "build_prompt",
    "readable_class_name",
]
