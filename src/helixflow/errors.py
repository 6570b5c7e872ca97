"""The one error type that the command line turns into a clean message and exit code."""

from __future__ import annotations

from pathlib import Path


class HelixflowError(Exception):
    """A problem with a user's file or setting, reported as ``error: <file>: <problem>``.

    Parameters
    ----------
    path
        The file (or setting) the problem is about.
    problem
        What is wrong and, where possible, how to fix it.
    """

    exit_code = 2

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
