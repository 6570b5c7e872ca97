"""Splitting is lossless, reads by rows, and refuses what it cannot stream."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helixflow.errors import HelixflowError
from helixflow.h5ad import chunk_bounds, inspect_h5ad, read_obs_rows
from helixflow.split import split_chunk, validate_input

from conftest import sha256


def split_all(path, out_dir, chunk_size):
    layout = inspect_h5ad(path)
    return [split_chunk(path, out_dir / f"chunk-{i:05d}.h5ad", start, stop)
            for i, (start, stop) in enumerate(chunk_bounds(layout.n_cells, chunk_size))]


def test_split_is_lossless(dataset, tmp_path):
    before = sha256(dataset)
    chunks = split_all(dataset, tmp_path, 170)  # 600 cells: 170, 170, 170, 90
    assert len(chunks) == 4
    original = ad.read_h5ad(dataset)
    joined = ad.concat([ad.read_h5ad(c) for c in chunks], merge="same")
    assert (joined.X != original.X).nnz == 0 and joined.X.dtype == original.X.dtype
    assert sp.isspmatrix_csr(joined.X) or isinstance(joined.X, sp.csr_array)
    pd.testing.assert_frame_equal(joined.obs, original.obs)
    pd.testing.assert_frame_equal(joined.var, original.var)
    assert sha256(dataset) == before  # the input is never modified


def test_dense_input_becomes_csr_chunks(dataset, tmp_path):
    original = ad.read_h5ad(dataset)
    dense = tmp_path / "dense.h5ad"
    ad.AnnData(X=original.X.toarray(), obs=original.obs, var=original.var).write_h5ad(dense)
    chunk = ad.read_h5ad(split_chunk(dense, tmp_path / "c.h5ad", 100, 200))
    assert sp.issparse(chunk.X)
    np.testing.assert_array_equal(chunk.X.toarray(), original.X[100:200].toarray())


def test_csc_input_is_refused_with_advice(dataset, tmp_path):
    original = ad.read_h5ad(dataset)
    csc = tmp_path / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(original.X), obs=original.obs, var=original.var).write_h5ad(csc)
    with pytest.raises(HelixflowError, match="CSC.*tocsr"):
        split_chunk(csc, tmp_path / "c.h5ad", 0, 10)
    assert not (tmp_path / "c.h5ad").exists()


def test_validate_summarises_input(dataset, tiny_v1, tmp_path):
    summary = validate_input(dataset, tiny_v1, tmp_path / "check.json")
    assert summary["cells"] == 600 and summary["genes"] == 1640
    assert summary["genes_in_vocabulary"] == 1600  # the 40 foreign genes are left out


def mixed_obs(n_cells: int, offset: int = 0, categories=("a", "b", "c")) -> pd.DataFrame:
    """obs columns of every kind anndata writes: categorical, float, int, bool, string, nullable."""
    rows = np.arange(offset, offset + n_cells)
    return pd.DataFrame({
        "cell_type": pd.Categorical(np.asarray(categories)[rows % len(categories)], categories=list(categories)),
        "n_counts": rows.astype(np.float64), "batch": rows % 4, "kept": rows % 2 == 0,
        "barcode": [f"bc{i}" for i in rows], "score": pd.array([None if i % 5 == 0 else i for i in rows], dtype="Int64"),
    }, index=pd.Index([f"cell{i}" for i in rows]))


def test_obs_rows_are_read_without_the_other_rows(tmp_path):
    path = tmp_path / "mixed.h5ad"
    ad.AnnData(X=sp.csr_matrix((50, 3), dtype=np.int32), obs=mixed_obs(50)).write_h5ad(path)
    with h5py.File(path, "r") as handle:
        pd.testing.assert_frame_equal(read_obs_rows(handle, 20, 35), ad.read_h5ad(path).obs.iloc[20:35])
        assert list(read_obs_rows(handle, 0, 3, ["n_counts"]).columns) == ["n_counts"]
