"""Reading .h5ad files by blocks of cells, never the whole matrix, and checking them first.

Only the rows asked for are read: the counts matrix through anndata's on-disk sparse dataset
(CSR row slices) or an h5py row slice (dense), ``obs`` column by column (h5py row slices). Files
are always opened read-only, so the input is never modified.

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
from anndata.io import read_elem, sparse_dataset, write_elem

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


def inspect_h5ad(path: str | Path, *, counts: str = "X") -> H5adLayout:
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


def read_var(path: str | Path, *, counts: str = "X") -> pd.DataFrame:
    """Return the gene table of a counts source: ``var``, or ``raw/var`` for ``raw``."""
    with h5py.File(path, "r") as handle:
        return read_elem(handle[gene_table_key(counts)])


def obs_has_column(path: str | Path, column: str) -> bool:
    """Whether ``obs`` of an .h5ad file has ``column`` (only the group's keys are read)."""
    with h5py.File(path, "r") as handle:
        return column in handle["obs"] and column != handle["obs"].attrs.get("_index")


def read_obs_rows(handle: h5py.File, start: int, stop: int, columns: list[str] | None = None) -> pd.DataFrame:
    """Return ``obs`` rows ``start:stop`` (all columns, or ``columns``) without reading other rows.

    Each column is an h5py row slice (categoricals: their codes, plus the categories), so
    memory is set by ``stop - start``, not by the file's number of cells.
    """
    obs = handle["obs"]
    if _encoding(obs) != "dataframe":
        raise HelixflowError(handle.filename, f"obs is not a dataframe (encoding '{_encoding(obs)}')")
    names = list(obs.attrs.get("column-order", []))
    names = names if columns is None else [name for name in names if name in columns]
    index_key = obs.attrs["_index"]
    frame = pd.DataFrame({name: _read_column_rows(obs[name], start, stop) for name in names},
                         index=pd.Index(_read_column_rows(obs[index_key], start, stop)), columns=names)
    if index_key != "_index":
        frame.index.name = index_key
    return frame


def _encoding(element) -> str:
    encoding = element.attrs.get("encoding-type", "")
    return encoding.decode() if isinstance(encoding, bytes) else str(encoding)


def _read_column_rows(element, start: int, stop: int):
    """Rows ``start:stop`` of one obs column, in the type anndata reads it as."""
    encoding = _encoding(element)
    if encoding == "string-array":
        return element.asstr()[start:stop]
    if encoding in ("array", ""):
        return element[start:stop]
    if encoding == "categorical":
        categories = read_elem(element["categories"])
        return pd.Categorical.from_codes(element["codes"][start:stop], categories=categories,
                                         ordered=bool(element.attrs.get("ordered", False)))
    if encoding in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        values = element["values"]
        values = values.asstr()[start:stop] if encoding == "nullable-string-array" else values[start:stop]
        mask = element["mask"][start:stop]
        if encoding == "nullable-string-array":
            return pd.array(np.where(mask, None, values), dtype="string")
        return pd.arrays.BooleanArray(values, mask) if encoding == "nullable-boolean" else pd.arrays.IntegerArray(values, mask)
    raise HelixflowError(element.file.filename, f"obs column '{element.name}' has an encoding helixflow cannot read by rows ('{encoding}')")


def iter_row_blocks(
    path: str | Path, start: int, stop: int, *, block_size: int, counts: str = "X"
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(first_row, counts)`` for rows ``start:stop`` of a counts source as CSR blocks.

    Peak memory is one block of ``block_size`` cells, whatever the file's size.
    """
    layout = inspect_h5ad(path, counts=counts)
    key = counts_key(counts)
    try:
        with h5py.File(path, "r") as handle:
            # Uncached indptr: a row slice reads only its part of the index pointers.
            matrix = sparse_dataset(handle[key], should_cache_indptr=False) if layout.x_format == "csr" else handle[key]
            for first in range(start, stop, block_size):
                last = min(stop, first + block_size)
                block = matrix[first:last]
                yield first, block if sp.issparse(block) else sp.csr_matrix(block)
    except (OSError, ValueError) as error:
        raise HelixflowError(path, f"truncated or corrupt .h5ad file ({error})") from None


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """Split ``n_cells`` into consecutive ``(start, stop)`` ranges of at most ``chunk_size``."""
    return [(start, min(n_cells, start + chunk_size)) for start in range(0, n_cells, chunk_size)]


# h5py turns a list of rows into one HDF5 selection whose bookkeeping grows with the list
# (about 100 MB for 50,000 scattered rows): lists of this many rows keep it small.
POINT_READ_ROWS = 256


def read_rows(dataset: h5py.Dataset, rows: np.ndarray, *, slab_bytes: int = 64 * 2**20) -> np.ndarray:
    """Rows ``rows`` (increasing) of an on-disk array, read in slabs of about ``slab_bytes``: memory is the rows asked for."""
    out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    if not len(rows):
        return out
    slab_rows = max(1, slab_bytes // (int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize))
    for first in range(int(rows[0]), int(rows[-1]) + 1, slab_rows):
        inside = slice(*np.searchsorted(rows, [first, first + slab_rows]))
        wanted = rows[inside]
        if not len(wanted):
            continue
        if len(wanted) * 8 < slab_rows:  # few rows in this slab: read just them, a few hundred at a time
            for group in range(inside.start, inside.stop, POINT_READ_ROWS):
                part = slice(group, min(inside.stop, group + POINT_READ_ROWS))
                out[part] = dataset[rows[part]]
        else:
            out[inside] = dataset[first : int(wanted[-1]) + 1][wanted - first]
    return out


def read_obs_column(handle: h5py.File, name: str, rows: np.ndarray, *, block_rows: int = 1_000_000) -> np.ndarray:
    """Values of obs column ``name`` at ``rows`` (increasing), read in blocks of ``block_rows`` rows."""
    n_rows = handle["obs"][handle["obs"].attrs["_index"]].shape[0]
    pieces = []
    for first in range(0, n_rows, block_rows):
        inside = rows[(rows >= first) & (rows < first + block_rows)]
        if len(inside):
            values = _read_column_rows(handle["obs"][name], first, min(n_rows, first + block_rows))
            pieces.append(np.asarray(values, dtype=object)[inside - first])
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=object)


GROWABLE = {"maxshape": (None,), "chunks": True}  # write_elem's datasets that append_obs can extend


def write_growable_obs(handle: h5py.Group, obs: pd.DataFrame) -> None:
    """Write ``obs`` as anndata does, in datasets that :func:`append_obs` can extend."""
    write_elem(handle, "obs", obs, dataset_kwargs=GROWABLE)


def append_obs(group: h5py.Group, rows: pd.DataFrame) -> None:
    """Append ``rows`` to an ``obs`` group written by :func:`write_growable_obs`.

    The rows must have the columns of the group's first rows, each of the same kind;
    categories new to a categorical column are added to its categories.
    """
    names = list(group.attrs["column-order"])
    if list(rows.columns) != names:
        raise HelixflowError(group.file.filename, f"obs columns {list(rows.columns)} differ from the first rows' {names}")
    _append_column(group[group.attrs["_index"]], np.asarray(rows.index, dtype=object), "_index")
    for name in names:
        _append_column(group[name], rows[name], name)


def _append_column(element, values, name: str) -> None:
    encoding = _encoding(element)
    if encoding == "categorical":
        if not isinstance(values.dtype, pd.CategoricalDtype):
            raise HelixflowError(element.file.filename, f"obs column '{name}' is categorical in the first rows only")
        known = list(read_elem(element["categories"]))
        new = [category for category in values.cat.categories if category not in set(known)]
        if new:
            _extend(element["categories"], np.asarray(new, dtype=object))
        position = {category: i for i, category in enumerate(known + new)}
        remap = np.array([position[category] for category in values.cat.categories] + [-1], dtype=np.int64)
        codes = remap[values.cat.codes.to_numpy()]  # code -1 (missing) maps to the trailing -1
        if len(known) + len(new) > np.iinfo(element["codes"].dtype).max:
            raise HelixflowError(element.file.filename, f"obs column '{name}' has too many categories to gather")
        _extend(element["codes"], codes.astype(element["codes"].dtype))
    elif encoding.startswith("nullable-"):
        array = pd.array(values)
        target = element["values"]
        na_value = "" if target.dtype.kind == "O" else 0  # under the mask, any value
        _extend(target, array.to_numpy(dtype=target.dtype if na_value == 0 else object, na_value=na_value))
        _extend(element["mask"], np.asarray(array.isna()))
    else:
        array = np.asarray(values)
        _extend(element, array.astype(object) if element.dtype.kind == "O" else array.astype(element.dtype))


def _extend(dataset: h5py.Dataset, values: np.ndarray) -> None:
    first = dataset.shape[0]
    dataset.resize((first + len(values),))
    dataset[first:] = values


def write_empty_matrix(handle: h5py.Group, key: str, n_rows: int, *, dtype=np.float32,
                       block_rows: int = 1_000_000) -> None:
    """Write an ``n_rows`` x 0 CSR matrix, as anndata does, without holding its index pointers in memory."""
    group = handle.create_group(key)
    group.attrs["encoding-type"] = "csr_matrix"
    group.attrs["encoding-version"] = "0.1.0"
    group.attrs["shape"] = (n_rows, 0)
    group.create_dataset("data", (0,), dtype=dtype)
    group.create_dataset("indices", (0,), dtype=np.int32)
    indptr = group.create_dataset("indptr", (n_rows + 1,), dtype=np.int64, chunks=True)
    for first in range(0, n_rows + 1, block_rows):
        indptr[first : min(n_rows + 1, first + block_rows)] = 0
