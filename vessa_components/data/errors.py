"""The one error type for bad input data: it always names the file (or folder) and the problem."""

from __future__ import annotations

import os

__all__ = ["DataError"]


class DataError(ValueError):
    """Raised when an input file or data set is unusable.

    Args:
        path: the file or folder at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)
