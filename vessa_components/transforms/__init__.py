from .label import CheckLabelRange, CheckLabelRanged

__all__ = ["CheckLabelRange", "CheckLabelRanged"]
