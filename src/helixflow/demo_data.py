"""A realistic synthetic single-cell dataset: raw counts, cell types with their own programs.

Counts follow a negative binomial (a Gamma-Poisson mixture), the usual model of UMI data;
library sizes are log-normal, so genes detected per cell spread widely, as in real data.
Each cell type expresses some genes no other type does (as lineage genes are) and
up-regulates its own markers, so rank-value encodings, and therefore Geneformer embeddings,
separate the types.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

from helixflow import synthetic
from helixflow.outputs import atomic_path

CELL_TYPES = ("T cell", "B cell", "NK cell", "monocyte", "dendritic cell", "erythroblast")
MARKERS_PER_TYPE = 60
EXCLUSIVE_FRACTION = 0.4  # share of genes expressed by one cell type only, as lineage genes are
DISPERSION = 2.0  # negative-binomial shape: smaller means noisier counts
BLOCK_VALUES = 20_000_000  # dense values generated at once: bounds memory for any size


def make_demo_dataset(
    out: str | Path,
    n_cells: int,
    *,
    n_genes: int = 1_600,
    n_foreign_genes: int = 40,
    mean_counts: float = 3_000.0,
    labels: bool = True,
    seed: int = 0,
) -> Path:
    """Write a synthetic raw-count dataset to ``out`` (.h5ad, CSR, int32), block by block.

    Parameters
    ----------
    out
        Output path.
    n_cells
        Number of cells.
    n_genes
        Genes drawn from the synthetic vocabulary (:mod:`helixflow.synthetic`).
    n_foreign_genes
        Extra genes outside every model vocabulary, which tokenization must skip.
    mean_counts
        Median library size (UMIs per cell).
    labels
        Write the ``cell_type`` column. Without it the same cells come as data to annotate,
        on which a run embeds and reports without fine-tuning.
    seed
        Random seed; the same seed gives the same file.
    """
    rng = np.random.default_rng(seed)
    gene_ids = np.concatenate([synthetic.gene_ids(n_genes), [f"ENSG99{i:09d}" for i in range(n_foreign_genes)]])
    symbols = np.concatenate([synthetic.gene_symbols(n_genes), [f"FOREIGN{i + 1}" for i in range(n_foreign_genes)]])
    n_total = len(gene_ids)
    profiles = _type_profiles(rng, n_total)

    cell_type = rng.integers(0, len(CELL_TYPES), size=n_cells)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cell_type, categories=list(CELL_TYPES)),
            "donor": pd.Categorical.from_codes(rng.integers(0, 3, size=n_cells), categories=["donor1", "donor2", "donor3"]),
        },
        index=pd.Index([f"cell{i:08d}" for i in range(n_cells)]),
    )
    if not labels:
        obs = obs.drop(columns="cell_type")
    var = pd.DataFrame({"ensembl_id": gene_ids, "gene_symbol": symbols}, index=pd.Index(gene_ids))

    out = Path(out)
    with atomic_path(out) as partial:
        skeleton = ad.AnnData(X=sp.csr_matrix((n_cells, n_total), dtype=np.int32), obs=obs, var=var)
        skeleton.uns["helixflow_demo"] = {"seed": seed, "mean_counts": mean_counts}
        skeleton.write_h5ad(partial)
        block = max(1, BLOCK_VALUES // n_total)
        with h5py.File(partial, "r+") as handle:
            del handle["X"]
            for start in range(0, n_cells, block):
                stop = min(n_cells, start + block)
                counts = _sample_counts(rng, profiles[cell_type[start:stop]], mean_counts)
                if start == 0:
                    write_elem(handle, "X", counts)
                    matrix = sparse_dataset(handle["X"])
                else:
                    matrix.append(counts)
    return out


def _type_profiles(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """Per-type gene expression probabilities: a shared background plus type markers."""
    background = rng.lognormal(mean=0.0, sigma=1.5, size=n_genes)
    profiles = np.tile(background, (len(CELL_TYPES), 1))
    exclusive = rng.choice(n_genes, size=int(EXCLUSIVE_FRACTION * n_genes), replace=False)
    owner = rng.integers(0, len(CELL_TYPES), size=len(exclusive))
    for index, row in enumerate(profiles):
        row[exclusive[owner != index]] = 0.0
        markers = rng.choice(n_genes, size=MARKERS_PER_TYPE, replace=False)
        row[markers] *= rng.uniform(8.0, 30.0, size=MARKERS_PER_TYPE)
    return profiles / profiles.sum(axis=1, keepdims=True)


def _sample_counts(rng: np.random.Generator, probabilities: np.ndarray, mean_counts: float) -> sp.csr_matrix:
    library = rng.lognormal(mean=np.log(mean_counts), sigma=0.5, size=(len(probabilities), 1))
    rate = library * probabilities * rng.gamma(DISPERSION, 1.0 / DISPERSION, size=probabilities.shape)
    return sp.csr_matrix(rng.poisson(rate).astype(np.int32))


def make_sparse_dataset(
    out: str | Path,
    n_cells: int,
    *,
    n_genes: int = 400,
    genes_per_cell: int = 8,
    block_cells: int = 250_000,
    seed: int = 0,
) -> Path:
    """Write a large, shallow raw-count dataset to ``out`` (.h5ad, CSR), block by block.

    Made for memory tests at millions of cells: every cell expresses ``genes_per_cell`` genes
    drawn from a pool of its cell type, so ``X`` is small, while ``obs`` (a string index and a
    categorical ``cell_type``) has one row per cell like any real dataset. Nothing of the size
    of the dataset is held in memory: each block of ``block_cells`` cells is written with h5py
    into datasets laid out as anndata writes them.
    """
    rng = np.random.default_rng(seed)
    gene_ids = synthetic.gene_ids(n_genes)
    pool = max(2 * genes_per_cell, n_genes // len(CELL_TYPES))
    n_values = n_cells * genes_per_cell
    out = Path(out)
    with atomic_path(out) as partial, h5py.File(partial, "w") as handle:
        _set_encoding(handle, "anndata", "0.1.0")
        x = handle.create_group("X")
        _set_encoding(x, "csr_matrix", "0.1.0")
        x.attrs["shape"] = (n_cells, n_genes)
        data = x.create_dataset("data", (n_values,), dtype=np.int32, chunks=True)
        indices = x.create_dataset("indices", (n_values,), dtype=np.int32, chunks=True)
        indptr = x.create_dataset("indptr", (n_cells + 1,), dtype=np.int64, chunks=True)
        indptr[0] = 0
        obs = handle.create_group("obs")
        _set_encoding(obs, "dataframe", "0.2.0")
        obs.attrs["_index"] = "_index"
        obs.attrs["column-order"] = ["cell_type"]
        index = obs.create_dataset("_index", (n_cells,), dtype=h5py.string_dtype(), chunks=True)
        _set_encoding(index, "string-array", "0.2.0")
        cell_type = obs.create_group("cell_type")
        _set_encoding(cell_type, "categorical", "0.2.0")
        cell_type.attrs["ordered"] = False
        write_elem(cell_type, "categories", np.array(CELL_TYPES, dtype=object))
        codes = cell_type.create_dataset("codes", (n_cells,), dtype=np.int8, chunks=True)
        for start in range(0, n_cells, block_cells):
            stop = min(n_cells, start + block_cells)
            types = rng.integers(0, len(CELL_TYPES), size=stop - start)
            # Each cell's genes: the first genes_per_cell of a random order of its type's pool, sorted.
            picks = np.sort(np.argsort(rng.random((stop - start, pool)), axis=1)[:, :genes_per_cell], axis=1)
            genes = (types[:, None] * pool + picks) % n_genes
            values = slice(start * genes_per_cell, stop * genes_per_cell)
            indices[values] = genes.ravel().astype(np.int32)
            data[values] = rng.integers(1, 30, size=genes.size, dtype=np.int32)
            indptr[start + 1 : stop + 1] = genes_per_cell * np.arange(start + 1, stop + 1, dtype=np.int64)
            index[start:stop] = np.array([f"cell{i:09d}" for i in range(start, stop)], dtype=object)
            codes[start:stop] = types.astype(np.int8)
        var = pd.DataFrame({"ensembl_id": gene_ids}, index=pd.Index(gene_ids))
        write_elem(handle, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(handle, key, {})
    return out


def _set_encoding(element, encoding_type: str, encoding_version: str) -> None:
    element.attrs["encoding-type"] = encoding_type
    element.attrs["encoding-version"] = encoding_version
