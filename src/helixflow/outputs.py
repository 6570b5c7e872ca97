"""Atomic output files: a step's result appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only on success.

    A crash or kill leaves at most a ``.partial`` file that the next attempt overwrites,
    never a truncated ``final`` that a rerun would mistake for a finished output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix last: some writers (anndata, pyarrow) choose the format by suffix.
    partial = final.with_name(f".{final.stem}.partial{final.suffix}")
    _remove(partial)
    try:
        yield partial
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            previous = final.with_name(f".{final.stem}.previous{final.suffix}")
            _remove(previous)
            os.replace(final, previous)
            os.replace(partial, final)
            _remove(previous)
        else:
            os.replace(partial, final)
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
