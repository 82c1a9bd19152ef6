from .io import atomic_path, latest_checkpoint, write_json, write_text
from .progress import progress_bar, show_progress

__all__ = ["atomic_path", "latest_checkpoint", "progress_bar", "show_progress", "write_json", "write_text"]
