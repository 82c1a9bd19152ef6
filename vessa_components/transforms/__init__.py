from .ct import RemapLabels, RemapLabelsd
from .overlay import TemplateOverlay, TemplateOverlayd
from .label import CheckLabelRange, CheckLabelRanged
from .ssl import RandCutMixBox, RandCutMixBoxd, cutmix_with_flipped_batch
from .view import ViewToReference, ViewToReferenced, warp_to_view

__all__ = [
    "CheckLabelRange",
    "CheckLabelRanged",
    "RandCutMixBox",
    "RandCutMixBoxd",
    "RemapLabels",
    "RemapLabelsd",
    "TemplateOverlay",
    "TemplateOverlayd",
    "ViewToReference",
    "ViewToReferenced",
    "cutmix_with_flipped_batch",
    "warp_to_view",
]
