"""A synthetic but realistically shaped gene universe shared by demo data and test models.

Real Geneformer dictionaries cannot be downloaded here, so the demo dataset and the tiny
models draw their genes from one deterministic list of Ensembl-style ids. The list is
prefix-stable: the first ``n`` ids are the same whatever ``n`` is asked for, so a dataset
made for a small vocabulary also fits a larger one.
"""

from __future__ import annotations

import numpy as np

# A step coprime with the id space spreads ids like real ones (ENSG00000141510, ...).
_ID_OFFSET = 100_000
_ID_STEP = 7_919
_ID_SPACE = 10**11


def gene_ids(n: int) -> np.ndarray:
    """Return ``n`` distinct human-style Ensembl gene ids (``ENSG`` + 11 digits)."""
    numbers = (_ID_OFFSET + _ID_STEP * np.arange(n, dtype=np.int64)) % _ID_SPACE
    return np.array([f"ENSG{number:011d}" for number in numbers], dtype=object)


def gene_symbols(n: int) -> np.ndarray:
    """Return ``n`` gene symbols matching :func:`gene_ids` position by position."""
    return np.array([f"SYN{i + 1}" for i in range(n)], dtype=object)


def gene_medians(n: int) -> np.ndarray:
    """Return per-gene non-zero median expression values, as Geneformer's median dictionary holds.

    Medians are log-normally spread, like the real ones (about 0.3 to 30 after
    normalisation to 10,000 counts per cell).
    """
    rng = np.random.default_rng(20_250_101)
    return np.exp(rng.normal(loc=0.5, scale=1.0, size=n)).astype(np.float64)
