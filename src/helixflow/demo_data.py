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
    n_genes: int = 1_600,
    n_foreign_genes: int = 40,
    mean_counts: float = 3_000.0,
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
