"""The ``validate`` and ``split`` steps: check the input once, then cut it into chunks of cells."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from helixflow.errors import HelixflowError
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_obs_rows
from helixflow.model_files import ModelFiles
from helixflow.outputs import atomic_path
from helixflow.tokenization import CellTokenizer

BLOCK_CELLS = 10_000  # cells read at once: bounds memory independently of chunk size


def validate_input(
    path: str | Path,
    files: ModelFiles,
    out: str | Path,
    gene_id_column: str = "ensembl_id",
    symbol_map: dict[str, str] | None = None,
    require_raw_counts: bool = True,
) -> dict:
    """Check a dataset against a model before any chunk is written; write a JSON summary.

    Checks the file's structure, the gene id column, the overlap with the model vocabulary
    and, with ``require_raw_counts``, that every count is a non-negative integer (one
    streaming pass over ``X``).
    """
    path = Path(path)
    layout = inspect_h5ad(path)
    with h5py.File(path, "r") as handle:
        var = read_elem(handle["var"])
        # What an orchestrator decides on (e.g. whether the label column is there) without the data.
        obs_columns = [str(column) for column in handle["obs"].attrs.get("column-order", [])]
    tokenizer = CellTokenizer(files, var, gene_id_column, symbol_map, path)
    nonzero = 0
    for first, block in iter_row_blocks(path, 0, layout.n_cells, BLOCK_CELLS):
        nonzero += block.nnz
        if require_raw_counts:
            _check_raw_counts(path, block, first)
    summary = {
        "input": str(path),
        "cells": layout.n_cells,
        "genes": layout.n_genes,
        "genes_in_vocabulary": tokenizer.n_vocabulary_genes,
        "x_format": layout.x_format,
        "obs_columns": obs_columns,
        "nonzero": nonzero,
        "model": files.model_name,
    }
    with atomic_path(out) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_raw_counts(path: Path, block: sp.csr_matrix, first_row: int) -> None:
    data = block.data
    bad = np.flatnonzero((data < 0) | (np.mod(data, 1) != 0)) if data.dtype.kind == "f" else np.flatnonzero(data < 0)
    if len(bad):
        row = first_row + int(np.searchsorted(block.indptr, bad[0], side="right") - 1)
        value = data[bad[0]]
        kind = "negative" if value < 0 else "non-integer"
        raise HelixflowError(
            path,
            f"X holds {kind} values (e.g. {value} in cell row {row}); Geneformer needs raw counts. "
            "Put raw counts in X, or set require_raw_counts: false to tokenize as is",
        )


def split_chunk(path: str | Path, out: str | Path, start: int, stop: int) -> Path:
    """Write cells ``start:stop`` of ``path`` (X as CSR, obs, var) to the chunk file ``out``."""
    layout = inspect_h5ad(path)
    if not 0 <= start < stop <= layout.n_cells:
        raise HelixflowError(path, f"cell range {start}:{stop} is outside 0:{layout.n_cells}")
    with h5py.File(path, "r") as handle:
        obs = read_obs_rows(handle, start, stop)
        var = read_elem(handle["var"])
    with atomic_path(out) as partial:
        skeleton = ad.AnnData(X=sp.csr_matrix((stop - start, layout.n_genes), dtype=layout.dtype), obs=obs, var=var)
        skeleton.uns["helixflow_chunk"] = {"source": str(path), "start": start, "stop": stop}
        skeleton.write_h5ad(partial)
        with h5py.File(partial, "r+") as handle:
            del handle["X"]
            for first, block in iter_row_blocks(path, start, stop, BLOCK_CELLS):
                if first == start:
                    write_elem(handle, "X", block)
                    matrix = sparse_dataset(handle["X"])
                else:
                    matrix.append(block)
    return Path(out)
