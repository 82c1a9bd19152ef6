from .io import atomic_path, latest_checkpoint, write_json, write_text

__all__ = ["atomic_path", "latest_checkpoint", "write_json", "write_text"]
