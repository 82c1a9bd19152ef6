from .ct import RemapLabels, RemapLabelsd
from .overlay import TemplateOverlay, TemplateOverlayd
from .label import CheckLabelRange, CheckLabelRanged
from .ssl import RandCutMixBox, RandCutMixBoxd, cutmix_with_flipped_batch

__all__ = [
    "CheckLabelRange",
    "CheckLabelRanged",
    "RandCutMixBox",
    "RandCutMixBoxd",
    "RemapLabels",
    "RemapLabelsd",
    "TemplateOverlay",
    "TemplateOverlayd",
    "cutmix_with_flipped_batch",
]
