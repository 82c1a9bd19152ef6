"""Networks: the semi-supervised students (UNet, DINOv2 + DPT) and the parts of the VESSA assistant (SAM2, Qwen3-VL)."""

from .dino_dpt import DinoDPT
from .factory import STUDENTS, build_student
from .sam2_parts import (
    SAM2_DEFAULT_CONFIG,
    SAM2_IMAGE_MEAN,
    SAM2_IMAGE_STD,
    SAM2_PRESETS,
    Sam2Parts,
    build_sam2_model,
    count_parameters,
    load_sam2_checkpoint,
)
from .unet import UNet
from .vessa import VESSA_ENCODER_NAME, VessaModel, VessaSegmenter, boxes_from_masks, build_vessa_model, feedback_prompts
from .vlm import VLM_TRAINING_MODES, PromptOutput, Qwen3VLPrompter, qwen3vl_2b_config, tiny_qwen3vl_config

__all__ = [
    "DinoDPT",
    "STUDENTS",
    "UNet",
    "build_student",
    "SAM2_DEFAULT_CONFIG",
    "SAM2_IMAGE_MEAN",
    "SAM2_IMAGE_STD",
    "SAM2_PRESETS",
    "Sam2Parts",
    "build_sam2_model",
    "count_parameters",
    "load_sam2_checkpoint",
    "VLM_TRAINING_MODES",
    "PromptOutput",
    "Qwen3VLPrompter",
    "qwen3vl_2b_config",
    "tiny_qwen3vl_config",
    "VESSA_ENCODER_NAME",
    "VessaModel",
    "VessaSegmenter",
    "boxes_from_masks",
    "feedback_prompts",
    "build_vessa_model",
]
