"""Public datasets as they come, unlabelled data, and bad inputs, through the front door.

Each dataset convention either runs to the same token ids as the same cells in the canonical
layout (raw counts in X, Ensembl ids in var['ensembl_id']), or stops at validation with an
error naming the file, the problem and the option that fixes it, with no outputs and the
input unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata.io import write_elem

from conftest import sha256
from helixflow.embedding import EMBEDDING_KEY
from helixflow.label_split import read_label_split
from helixflow.run_lock import LOCK_NAME
from helixflow.tokenization import open_tokens, tokenize_chunk


def helixflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helixflow.cli", *args], capture_output=True, text=True, cwd=cwd)


def run(path: Path, out: Path, models_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``helixflow run`` with one chunk (each job costs seconds of start-up on a busy machine)."""
    return helixflow("run", str(path), "--out", str(out), "--models-dir", str(models_dir), "--cores", "2",
                     "--chunk-size", "1000", *extra, cwd=path.parent)


def produced_files(out: Path) -> list[Path]:
    """Outputs of a run, leaving out its logs, benchmarks and the folder's (emptied) run lock."""
    if not out.exists():
        return []
    return [p for p in out.rglob("*") if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts
            and p.name != LOCK_NAME]


def run_tokens(out: Path) -> list[list[int]]:
    return [ids for chunk in sorted((out / "tokens").glob("chunk-*.arrow"))
            for ids in open_tokens(chunk).column("input_ids").to_pylist()]


def normalised(counts: sp.csr_matrix) -> sp.csr_matrix:
    """scanpy's normalize_total + log1p: what X holds in most processed public datasets."""
    x = sp.csr_matrix(counts, dtype=np.float32)
    x = sp.csr_matrix(x.multiply(1e4 / np.asarray(x.sum(axis=1)).clip(1)))
    x.data = np.log1p(x.data)
    return x


# ---------------------------------------------------------------------------------------------
# Conventions that run: token ids equal the canonical layout's.

def scanpy_layer(canonical: ad.AnnData) -> ad.AnnData:
    """X log-normalised, raw counts in layers['counts'], Ensembl ids only as var_names."""
    var = pd.DataFrame(index=canonical.var["ensembl_id"].to_numpy())
    return ad.AnnData(X=normalised(canonical.X), obs=canonical.obs, var=var, layers={"counts": canonical.X.copy()})


def raw_versioned(canonical: ad.AnnData) -> ad.AnnData:
    """Counts in .raw (all genes, versioned GENCODE ids in raw/var); X a normalised subset of genes."""
    versions = [f".{1 + i % 9}" for i in range(canonical.n_vars)]
    raw_var = pd.DataFrame({"feature_name": canonical.var["gene_symbol"].to_numpy()},
                           index=[gene + version for gene, version in zip(canonical.var["ensembl_id"], versions)])
    full = ad.AnnData(X=canonical.X.copy(), obs=canonical.obs, var=raw_var)
    adata = ad.AnnData(X=normalised(canonical.X[:, :300]), obs=canonical.obs, var=raw_var.iloc[:300].copy())
    adata.raw = full
    return adata


def tenx_gene_ids(canonical: ad.AnnData) -> ad.AnnData:
    """Cell Ranger's layout: symbols as var_names, Ensembl ids in var['gene_ids']."""
    var = pd.DataFrame({"gene_ids": canonical.var["ensembl_id"].to_numpy(), "feature_types": "Gene Expression"},
                       index=canonical.var["gene_symbol"].to_numpy())
    return ad.AnnData(X=canonical.X.copy(), obs=canonical.obs, var=var)


def symbols_only(canonical: ad.AnnData) -> ad.AnnData:
    """Gene symbols only (as the original showcase's sample); one an alias only the user's table knows."""
    symbols = canonical.var["gene_symbol"].to_numpy().copy()
    symbols[4] = "MYALIAS5"
    return ad.AnnData(X=canonical.X.copy(), obs=canonical.obs, var=pd.DataFrame(index=symbols))


CONVENTIONS = {
    "scanpy_layer": (scanpy_layer, {"counts_source": "layers/counts", "column": "var_names", "holds": "Ensembl ids"}),
    "raw_versioned": (raw_versioned, {"counts_source": "raw", "column": "var_names", "holds": "Ensembl ids"}),
    "tenx_gene_ids": (tenx_gene_ids, {"counts_source": "X", "column": "var['gene_ids']", "holds": "Ensembl ids"}),
    "symbols_only": (symbols_only, {"counts_source": "X", "column": "var_names", "holds": "gene symbols"}),
}


@pytest.fixture(scope="module")
def canonical(dataset):
    return ad.read_h5ad(dataset)


@pytest.fixture(scope="module")
def canonical_tokens(dataset, tiny_v1, tmp_path_factory) -> list[list[int]]:
    out = tmp_path_factory.mktemp("canonical") / "tokens.arrow"
    tokenize_chunk(dataset, tiny_v1, out, gene_id_column="ensembl_id")
    return open_tokens(out).column("input_ids").to_pylist()


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_public_convention_gives_canonical_tokens(convention, canonical, canonical_tokens, models_dir, tmp_path):
    build, expected = CONVENTIONS[convention]
    path = tmp_path / f"{convention}.h5ad"
    build(canonical).write_h5ad(path)
    before = sha256(path)
    extra = []
    if convention == "symbols_only":
        table = tmp_path / "aliases.tsv"
        table.write_text(f"symbol\tensembl_id\nMYALIAS5\t{canonical.var['ensembl_id'].iloc[4]}\n")
        extra = ["--gene-symbol-map", str(table)]
    out = tmp_path / "out"
    result = run(path, out, models_dir, "--until", "tokenize", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_tokens(out) == canonical_tokens
    check = json.loads((out / "qc" / "input_check.json").read_text())
    assert check["counts_source"] == expected["counts_source"]
    genes = check["gene_ids"]
    assert (genes["column"], genes["holds"], genes["detected"]) == (expected["column"], expected["holds"], True)
    assert genes["in_vocabulary"] == 1600 and genes["genes"] == 1640 and check["warnings"] == []
    log = (out / "logs" / "validate_input.log").read_text()
    assert f"counts: {expected['counts_source']}" in log and f"gene ids: {expected['column']}" in log
    assert genes["table"] == ("raw/var" if convention == "raw_versioned" else "var")
    if convention == "raw_versioned":
        assert genes["version_suffixes_stripped"] == 1640
        assert "X holds non-integer values" in check["counts_source_reason"] and "raw/X holds integer counts" in check["counts_source_reason"]
    if convention == "scanpy_layer":
        assert "layers/counts holds integer counts" in check["counts_source_reason"]
    if convention == "symbols_only":
        assert genes["matched_by"] == {"symbol via the model's ensembl_mapping_dict.pkl": 1599,
                                       "gene_symbol_map (user table)": 1}
    else:
        assert genes["matched_by"] == {"Ensembl id in the dataset": 1600}
    assert sha256(path) == before


def test_few_vocabulary_genes_is_a_warning(canonical, tiny_v1, tmp_path, caplog):
    """The validate step (the front door adds nothing here): a share below one half is reported."""
    from helixflow.split import validate_input

    adata = canonical.copy()
    ids = adata.var["ensembl_id"].to_numpy().copy()
    ids[:1000] = [f"ENSG77{i:09d}" for i in range(1000)]  # genes of no model vocabulary
    adata.var["ensembl_id"] = ids
    path = tmp_path / "mostly_foreign.h5ad"
    adata.write_h5ad(path)
    with caplog.at_level("WARNING", logger="helixflow.split"):
        summary = validate_input(path, tiny_v1, tmp_path / "check.json")
    assert summary["gene_ids"]["in_vocabulary"] == 600 and summary["gene_ids"]["share_in_vocabulary"] == round(600 / 1640, 4)
    assert "only 600 of 1,640 genes (37%)" in summary["warnings"][0]
    assert "only 600 of 1,640 genes" in caplog.text
    assert json.loads((tmp_path / "check.json").read_text())["warnings"] == summary["warnings"]


# ---------------------------------------------------------------------------------------------
# Unlabelled data: a first-class run. Partly labelled data: unlabelled cells embedded, not trained on.

@pytest.fixture(scope="module")
def unlabelled_run(canonical, models_dir, tmp_path_factory):
    """No cell-type column, and every cell name twice (as after concatenating two samples)."""
    folder = tmp_path_factory.mktemp("unlabelled")
    adata = canonical.copy()
    del adata.obs["cell_type"]
    adata.obs_names = [f"AAACCTG-{i % (adata.n_obs // 2)}" for i in range(adata.n_obs)]
    path = folder / "unlabelled.h5ad"
    adata.write_h5ad(path)
    before = sha256(path)
    result = run(path, folder / "out", models_dir)
    return path, before, folder / "out", result


def test_unlabelled_data_runs_without_fine_tuning(unlabelled_run):
    path, before, out, result = unlabelled_run
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "fine-tuning skipped" in line]
    assert skipped and "no column 'cell_type'" in skipped[0]
    assert not (out / "finetune").exists() and not (out / "evaluate").exists()
    assert (out / "report.html").is_file() and (out / "report" / "embedding_map.png").stat().st_size > 10_000
    summary = json.loads((out / "report" / "embedding_summary.json").read_text())
    assert summary["cells_plotted"] == 600 and summary["coloured_by"].startswith("k-means cluster (k=")
    assert json.loads((out / "qc" / "input_check.json").read_text())["label_column"] == {"name": "cell_type", "present": False}
    assert sha256(path) == before


def test_duplicate_cell_names_are_kept_in_input_order(unlabelled_run):
    path, _, out, result = unlabelled_run
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((out / "qc" / "input_check.json").read_text())
    assert check["duplicate_cell_names"] == 300 and "occur more than once" in check["warnings"][0]
    embeddings = ad.read_h5ad(out / "embeddings" / "embeddings.h5ad")
    assert list(embeddings.obs_names) == list(ad.read_h5ad(path, backed="r").obs_names)
    assert np.isfinite(embeddings.obsm[EMBEDDING_KEY]).all()


def test_partly_labelled_cells_are_embedded_and_left_out_of_training(canonical, models_dir, tmp_path):
    adata = canonical.copy()
    labels = adata.obs["cell_type"].astype(object)
    labels.iloc[::3] = None
    adata.obs["cell_type"] = pd.Categorical(labels)
    path = tmp_path / "partly_labelled.h5ad"
    adata.write_h5ad(path)
    result = run(path, tmp_path / "out", models_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    split = read_label_split(tmp_path / "out" / "finetune" / "label_split.tsv")
    unlabelled = labels.isna().to_numpy()
    assert (split["split"].to_numpy()[unlabelled] == "excluded").all()
    assert set(split["split"].to_numpy()[~unlabelled]) == {"train", "validation"}
    embeddings = ad.read_h5ad(tmp_path / "out" / "embeddings" / "embeddings.h5ad")
    assert embeddings.n_obs == 600 and np.isfinite(embeddings.obsm[EMBEDDING_KEY]).all()
    metrics = json.loads((tmp_path / "out" / "evaluate" / "metrics.json").read_text())
    assert metrics["validation_cells"] == (split["split"] == "validation").sum()


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file, the problem and the fix; no outputs; input unchanged.

def with_value(adata: ad.AnnData, value: float) -> ad.AnnData:
    adata.X = adata.X.astype(np.float32)
    adata.X.data[7] = value
    return adata


def rewrite_table(path: Path, key: str, rows: int) -> None:
    """Replace a table of a written file by one of ``rows`` rows: a file anndata would not write."""
    with h5py.File(path, "r+") as handle:
        del handle[key]
        write_elem(handle, key, pd.DataFrame(index=[f"row{i}" for i in range(rows)]))


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
    if kind == "no_gene_ids":
        adata.var = pd.DataFrame(index=[f"feature{i}" for i in range(adata.n_vars)])
    elif kind == "no_vocabulary_gene":
        foreign = [f"ENSG88{i:09d}" for i in range(adata.n_vars)]
        adata.var = pd.DataFrame({"ensembl_id": foreign}, index=foreign)
    elif kind == "negative_counts":
        adata = with_value(adata, -3)
    elif kind == "non_integer_counts":
        adata = with_value(adata, 0.5)
    elif kind == "nan_counts":
        adata = with_value(adata, np.nan)
    elif kind == "infinite_counts":
        adata = with_value(adata, np.inf)
    elif kind == "normalised_x_only":
        adata.X = normalised(adata.X)
    elif kind == "zero_cells":
        adata = adata[:0].copy()
        adata.X = sp.csr_matrix((0, adata.n_vars), dtype=np.int32)
    adata.write_h5ad(path)
    if kind == "obs_size_mismatch":
        rewrite_table(path, "obs", adata.n_obs - 5)
    elif kind == "var_size_mismatch":
        rewrite_table(path, "var", adata.n_vars + 2)
    return path


# kind -> (what the error says: the problem and the option that fixes it; extra run options)
CASES = {
    "not_h5ad": (["not an .h5ad file"], []),
    "truncated": (["truncated or corrupt"], []),
    "no_gene_ids": (["found no gene ids", "gene_id_column (helixflow run --gene-id-column", "--gene-symbol-map"], []),
    "missing_gene_column": (["no gene id column 'feature_id'", "--gene-id-column"], ["--gene-id-column", "feature_id"]),
    "no_vocabulary_gene": (["is in the vocabulary", "--gene-id-column"], []),
    "negative_counts": (["X holds negative values", "counts_source (helixflow run --counts-source", "--allow-any-values"], []),
    "non_integer_counts": (["X holds non-integer values", "--counts-source", "--allow-any-values"], []),
    "normalised_x_only": (["X holds non-integer values", "ranks of these values would be wrong", "--counts-source"], []),
    "nan_counts": (["X holds NaN values", "--counts-source"], []),
    "infinite_counts": (["X holds infinite values", "--counts-source"], []),
    "nan_counts_any_values": (["X holds NaN values"], ["--allow-any-values"]),
    "missing_counts_source": (["no counts source 'layers/counts'", "--counts-source"], ["--counts-source", "layers/counts"]),
    "obs_size_mismatch": (["obs has 595 rows but X has 600 cells"], []),
    "var_size_mismatch": (["var has 1,642 rows but X has 1,640 genes", "--counts-source"], []),
    "zero_cells": (["zero cells"], []),
}
BUILT_AS = {"missing_gene_column": "good", "nan_counts_any_values": "nan_counts", "missing_counts_source": "good"}


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_fails_cleanly(kind, dataset, models_dir, tmp_path):
    built = BUILT_AS.get(kind, kind)
    bad = make_bad(built, dataset, tmp_path) if built != "good" else Path(tmp_path / "good.h5ad")
    if built == "good":
        bad.write_bytes(dataset.read_bytes())
    before = sha256(bad)
    expected, extra = CASES[kind]
    out = tmp_path / "out"
    result = run(bad, out, models_dir, *extra)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    # The front door's last line is the failing step's own error: the file and the problem.
    assert last.startswith("helixflow: error: ") and bad.name in last and expected[0] in last, result.stderr[-3000:]
    for part in expected:
        assert part in last
    assert produced_files(out) == []
    lock = out / LOCK_NAME
    assert not lock.exists() or lock.read_text() == "", "the run's lock was not released"
    assert sha256(bad) == before


def test_unknown_profile_is_a_clear_error(dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--model", "gf-99L", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown model profile 'gf-99L'" in result.stderr and "tiny" in result.stderr
    assert not (tmp_path / "o").exists()
