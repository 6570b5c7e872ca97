"""Reading .h5ad files by blocks of cells, never the whole matrix, and checking them first.

Only the rows asked for are read: the counts matrix through anndata's on-disk sparse dataset
(CSR row slices) or an h5py row slice (dense), ``obs`` through anndata's lazy reader. Files are
always opened read-only, so the input is never modified.

Raw counts may sit where public datasets keep them: in ``X`` (helixflow's own and 10x's
convention), in a layer (``layers/counts``, scanpy's habit, with a normalised ``X``), or in
``.raw`` (``raw/X`` with ``raw/var`` as its gene table, CELLxGENE's convention). A *counts
source* names one of them: ``"X"``, ``"layers/NAME"`` or ``"raw"``.
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


COUNTS_OPTION = "counts_source (helixflow run --counts-source X, raw or layers/NAME)"


@dataclass(frozen=True)
class H5adLayout:
    """Shape and storage of an .h5ad file's counts matrix (``X`` unless another source is read)."""

    path: Path
    n_cells: int
    n_genes: int
    x_format: str  # "csr" or "dense"
    dtype: np.dtype
    counts: str = "X"  # the counts source described


def counts_key(source: str) -> str:
    """HDF5 path of a counts source's matrix: ``X``, ``raw/X`` or ``layers/NAME``."""
    if source == "X":
        return "X"
    if source == "raw":
        return "raw/X"
    if source.startswith("layers/") and len(source) > len("layers/") and source.count("/") == 1:
        return source
    raise HelixflowError("counts_source", f"'{source}' is not a counts source; use X, raw or layers/NAME")


def gene_table_key(source: str) -> str:
    """HDF5 path of the gene table that describes a counts source's columns."""
    return "raw/var" if counts_key(source) == "raw/X" else "var"


def counts_sources(handle: h5py.File) -> list[str]:
    """The counts sources an open .h5ad file holds: ``X``, each layer, then ``raw``."""
    sources = ["X"] if "X" in handle else []
    if isinstance(handle.get("layers"), h5py.Group):
        sources += [f"layers/{name}" for name in handle["layers"]]
    if "raw" in handle and "X" in handle["raw"]:
        sources.append("raw")
    return sources


def inspect_h5ad(path: str | Path, counts: str = "X") -> H5adLayout:
    """Check that ``path`` is a readable .h5ad with cells stored by rows; describe its counts.

    Parameters
    ----------
    path
        The dataset.
    counts
        The counts source to describe (``X``, ``raw`` or ``layers/NAME``); ``auto`` describes
        ``X`` (or the first source of a file without one): enough for the cells' number, while
        the validate step chooses the source to read.

    Raises
    ------
    HelixflowError
        When the file is missing, not HDF5, truncated, lacks ``obs``/``var`` or the counts
        source, stores it column-wise, has ``obs`` or the gene table disagreeing with its
        shape, or holds zero cells or genes.
    """
    path = Path(path)
    key = counts_key(counts) if counts != "auto" else None
    if not path.is_file():
        raise HelixflowError(path, "no such file")
    if not h5py.is_hdf5(path):
        raise HelixflowError(path, "not an .h5ad file (no HDF5 signature)")
    try:
        with h5py.File(path, "r") as handle:
            for group in ("obs", "var"):
                if group not in handle:
                    raise HelixflowError(path, f"not an AnnData file: no '{group}' group")
            if key is None:
                counts = "X" if "X" in handle else next(iter(counts_sources(handle)), "X")
                key = counts_key(counts)
            if key not in handle:
                if key == "X" and counts_sources(handle):
                    raise HelixflowError(path, f"the file has no X; read counts from one of {', '.join(counts_sources(handle))} "
                                               f"with {COUNTS_OPTION}")
                if key == "X":
                    raise HelixflowError(path, "not an AnnData file: no 'X' group")
                held = ", ".join(counts_sources(handle)) or "none"
                raise HelixflowError(path, f"no counts source '{counts}' in the file (it holds: {held}); set {COUNTS_OPTION}")
            layout = _matrix_layout(path, handle[key], key, counts)
            _check_table_sizes(path, handle, key, layout)
    except HelixflowError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise HelixflowError(path, f"truncated or corrupt .h5ad file ({error})") from None
    if layout.n_cells == 0:
        raise HelixflowError(path, "the dataset has zero cells")
    if layout.n_genes == 0:
        raise HelixflowError(path, "the dataset has zero genes")
    return layout


def _matrix_layout(path: Path, matrix: h5py.Group | h5py.Dataset, key: str, counts: str) -> H5adLayout:
    if isinstance(matrix, h5py.Group):
        encoding = matrix.attrs.get("encoding-type", "")
        if encoding == "csc_matrix":
            raise HelixflowError(path, CSC_ADVICE if key == "X" else (
                f"{key} is stored column-wise (CSC), which cannot be read cell by cell in bounded memory; "
                "convert it once to CSR (scipy's .tocsr()) and write the file again"))
        if encoding != "csr_matrix":
            raise HelixflowError(path, f"unsupported {key} encoding '{encoding}'")
        n_cells, n_genes = (int(n) for n in matrix.attrs["shape"])
        # Touch the last index pointer: a truncated file fails here, not mid-run.
        _ = matrix["indptr"][-1]
        return H5adLayout(path, n_cells, n_genes, "csr", matrix["data"].dtype, counts)
    if matrix.ndim != 2:
        raise HelixflowError(path, f"{key} has {matrix.ndim} dimensions, expected 2")
    return H5adLayout(path, int(matrix.shape[0]), int(matrix.shape[1]), "dense", matrix.dtype, counts)


def _table_rows(group: h5py.Group) -> int:
    """Rows of a stored data frame, from its index (no column is read)."""
    return int(group[group.attrs["_index"]].shape[0])


def _check_table_sizes(path: Path, handle: h5py.File, key: str, layout: H5adLayout) -> None:
    """obs must have one row per cell and the gene table one row per column of the counts."""
    cells = _table_rows(handle["obs"])
    if cells != layout.n_cells:
        raise HelixflowError(path, f"obs has {cells:,} rows but {key} has {layout.n_cells:,} cells; the file is "
                                   "inconsistent (not written by anndata?): rewrite it with matching obs and X")
    genes_key = "raw/var" if key == "raw/X" else "var"
    genes = _table_rows(handle[genes_key])
    if genes != layout.n_genes:
        raise HelixflowError(path, f"{genes_key} has {genes:,} rows but {key} has {layout.n_genes:,} genes; the file is "
                                   f"inconsistent: rewrite it with one {genes_key} row per column of {key}"
                                   + ("" if key == "raw/X" else f", or read counts elsewhere with {COUNTS_OPTION}"))


def read_var(path: str | Path, counts: str = "X") -> pd.DataFrame:
    """Return the gene table of a counts source: ``var``, or ``raw/var`` for ``raw``."""
    with h5py.File(path, "r") as handle:
        return read_elem(handle[gene_table_key(counts)])


def obs_has_column(path: str | Path, column: str) -> bool:
    """Whether ``obs`` of an .h5ad file has ``column`` (only the group's keys are read)."""
    with h5py.File(path, "r") as handle:
        return column in handle["obs"] and column != handle["obs"].attrs.get("_index")


def read_obs_rows(handle: h5py.File, start: int, stop: int) -> pd.DataFrame:
    """Return ``obs`` rows ``start:stop`` without loading the other rows."""
    lazy = read_elem_lazy(handle["obs"])
    rows = lazy.iloc[start:stop]
    return rows.to_memory() if hasattr(rows, "to_memory") else rows


def iter_row_blocks(
    path: str | Path, start: int, stop: int, block_size: int, counts: str = "X"
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, counts)`` for rows ``start:stop`` of a counts source as CSR blocks.

    Peak memory is one block of ``block_size`` cells, whatever the file's size.
    """
    layout = inspect_h5ad(path, counts)
    key = counts_key(counts)
    try:
        with h5py.File(path, "r") as handle:
            matrix = sparse_dataset(handle[key]) if layout.x_format == "csr" else handle[key]
            for first in range(start, stop, block_size):
                last = min(stop, first + block_size)
                block = matrix[first:last]
                yield first, block if sp.issparse(block) else sp.csr_matrix(block)
    except (OSError, ValueError) as error:
        raise HelixflowError(path, f"truncated or corrupt .h5ad file ({error})") from None


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split ``n_cells`` into consecutive ``(start, stop)`` ranges of at most ``chunk_size``."""
    return [(start, min(n_cells, start + chunk_size)) for start in range(0, n_cells, chunk_size)]
