"""Every bad input ends with a clear error naming the file, a non-zero exit, no outputs,
and an unchanged input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import sha256


def make_bad(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.h5ad"
    if kind == "not_h5ad":
        path.write_text("cell,gene,count\n")
        return path
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    adata = ad.read_h5ad(good)
    if kind == "no_gene_column":
        adata.var = adata.var.drop(columns=["ensembl_id"])
    elif kind == "no_vocabulary_gene":
        adata.var["ensembl_id"] = [f"NOTAGENE{i}" for i in range(adata.n_vars)]
    elif kind == "negative_counts":
        adata.X = adata.X.astype(np.float32)
        adata.X.data[5] = -3
    elif kind == "non_integer_counts":
        adata.X = adata.X.astype(np.float32)
        adata.X.data[7] = 0.5
    elif kind == "zero_cells":
        adata = adata[:0].copy()
        adata.X = sp.csr_matrix((0, adata.n_vars), dtype=np.int32)
    adata.write_h5ad(path)
    return path


CASES = {
    "not_h5ad": "not an .h5ad file",
    "truncated": "truncated or corrupt",
    "no_gene_column": "no gene id column 'ensembl_id'",
    "no_vocabulary_gene": "is in the vocabulary",
    "negative_counts": "negative values",
    "non_integer_counts": "non-integer values",
    "zero_cells": "zero cells",
}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_fails_cleanly(kind, dataset, models_dir, tmp_path):
    bad = make_bad(kind, dataset, tmp_path)
    before = sha256(bad)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "helixflow.cli", "run", str(bad), "--out", str(out), "--models-dir", str(models_dir),
         "--cores", "1"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode != 0
    assert CASES[kind] in result.stderr + result.stdout
    assert str(bad.name) in result.stderr + result.stdout
    produced = [p for p in out.rglob("*") if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts] if out.exists() else []
    assert produced == []
    assert sha256(bad) == before


def test_unknown_profile_is_a_clear_error(dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--model", "gf-99L", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown model profile 'gf-99L'" in result.stderr and "tiny" in result.stderr
    assert not (tmp_path / "o").exists()
