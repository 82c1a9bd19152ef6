"""Progress bars for long commands: drawn when the user watches a terminal, silent when output goes to a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

__all__ = ["progress_bar", "show_progress"]


def show_progress(stream: IO | None = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``, where tqdm and Ignite's ``ProgressBar`` draw) is an interactive
    terminal. Redirected to a file or a pipe (a batch job, ``nohup``, CI) it is not, and bars would only fill the log
    with carriage returns."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    iterable: Iterable | None = None, enabled: bool | None = None, file: IO | None = None, **kwargs: Any
) -> tqdm:
    """``tqdm(iterable, **kwargs)`` drawn on ``file`` (default ``sys.stderr``) when ``enabled``; ``enabled=None``
    means "when ``file`` is a terminal" (:func:`show_progress`). A disabled bar iterates and writes nothing."""
    if enabled is None:
        enabled = show_progress(file)
    return tqdm(iterable, disable=not enabled, file=file, **kwargs)
