"""Reading .h5ad files by blocks of cells, never the whole matrix, and checking them first.

Only the rows asked for are read: ``X`` through anndata's on-disk sparse dataset (CSR row
slices) or an h5py row slice (dense), ``obs`` through anndata's lazy reader. Files are always
opened read-only, so the input is never modified.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.experimental import read_elem_lazy
from anndata.io import read_elem, sparse_dataset

from helixflow.errors import HelixflowError

CSC_ADVICE = (
    "X is stored column-wise (CSC), which cannot be read cell by cell in bounded memory; "
    "convert it once to CSR, e.g. python -c \"import anndata as ad; a = ad.read_h5ad('IN.h5ad'); "
    "a.X = a.X.tocsr(); a.write_h5ad('OUT.h5ad')\""
)


@dataclass(frozen=True)
class H5adLayout:
    """Shape and storage of an .h5ad file's ``X``."""

    path: Path
    n_cells: int
    n_genes: int
    x_format: str  # "csr" or "dense"
    dtype: np.dtype


def inspect_h5ad(path: str | Path) -> H5adLayout:
    """Check that ``path`` is a readable .h5ad with cells stored by rows; describe its ``X``.

    Raises
    ------
    HelixflowError
        When the file is missing, not HDF5, truncated, lacks ``X``/``obs``/``var``, stores
        ``X`` column-wise, or holds zero cells or genes.
    """
    path = Path(path)
    if not path.is_file():
        raise HelixflowError(path, "no such file")
    if not h5py.is_hdf5(path):
        raise HelixflowError(path, "not an .h5ad file (no HDF5 signature)")
    try:
        with h5py.File(path, "r") as handle:
            for key in ("X", "obs", "var"):
                if key not in handle:
                    raise HelixflowError(path, f"not an AnnData file: no '{key}' group")
            x = handle["X"]
            if isinstance(x, h5py.Group):
                encoding = x.attrs.get("encoding-type", "")
                if encoding == "csc_matrix":
                    raise HelixflowError(path, CSC_ADVICE)
                if encoding != "csr_matrix":
                    raise HelixflowError(path, f"unsupported X encoding '{encoding}'")
                n_cells, n_genes = (int(n) for n in x.attrs["shape"])
                layout = H5adLayout(path, n_cells, n_genes, "csr", x["data"].dtype)
                # Touch the last index pointer: a truncated file fails here, not mid-run.
                _ = x["indptr"][-1]
            else:
                if x.ndim != 2:
                    raise HelixflowError(path, f"X has {x.ndim} dimensions, expected 2")
                layout = H5adLayout(path, int(x.shape[0]), int(x.shape[1]), "dense", x.dtype)
    except HelixflowError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise HelixflowError(path, f"truncated or corrupt .h5ad file ({error})") from None
    if layout.n_cells == 0:
        raise HelixflowError(path, "the dataset has zero cells")
    if layout.n_genes == 0:
        raise HelixflowError(path, "the dataset has zero genes")
    return layout


def read_var(path: str | Path) -> pd.DataFrame:
    """Return the gene table (``var``) of an .h5ad file."""
    with h5py.File(path, "r") as handle:
        return read_elem(handle["var"])


def read_obs_rows(handle: h5py.File, start: int, stop: int) -> pd.DataFrame:
    """Return ``obs`` rows ``start:stop`` without loading the other rows."""
    lazy = read_elem_lazy(handle["obs"])
    rows = lazy.iloc[start:stop]
    return rows.to_memory() if hasattr(rows, "to_memory") else rows


def iter_row_blocks(
    path: str | Path, start: int, stop: int, block_size: int
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, counts)`` for rows ``start:stop`` of ``X`` as CSR blocks.

    Peak memory is one block of ``block_size`` cells, whatever the file's size.
    """
    layout = inspect_h5ad(path)
    try:
        with h5py.File(path, "r") as handle:
            matrix = sparse_dataset(handle["X"]) if layout.x_format == "csr" else handle["X"]
            for first in range(start, stop, block_size):
                last = min(stop, first + block_size)
                block = matrix[first:last]
                yield first, block if sp.issparse(block) else sp.csr_matrix(block)
    except (OSError, ValueError) as error:
        raise HelixflowError(path, f"truncated or corrupt .h5ad file ({error})") from None


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split ``n_cells`` into consecutive ``(start, stop)`` ranges of at most ``chunk_size``."""
    return [(start, min(n_cells, start + chunk_size)) for start in range(0, n_cells, chunk_size)]
