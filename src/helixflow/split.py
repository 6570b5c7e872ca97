"""The ``validate`` and ``split`` steps: check the input once, then cut it into chunks of cells."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from helixflow.errors import HelixflowError
from helixflow.h5ad import (COUNTS_OPTION, counts_key, counts_sources, gene_table_key, inspect_h5ad, iter_row_blocks,
                            obs_has_column, read_obs_rows, read_var)
from helixflow.families import load_family
from helixflow.outputs import atomic_path

BLOCK_CELLS = 10_000  # cells read at once: bounds memory independently of chunk size
SAMPLE_CELLS = 1_000  # cells whose values tell raw counts from normalised ones
SAMPLE_VALUES = 10_000_000  # at most this many matrix entries in that sample (dense matrices)
# Layer names public datasets keep raw counts under, most common first (scanpy tutorials: "counts").
RAW_COUNT_LAYERS = ("counts", "raw_counts", "raw", "umi_counts", "umis")
LOW_VOCABULARY_SHARE = 0.5  # below this share of genes in the vocabulary, a warning
LOGGER = logging.getLogger(__name__)


def validate_input(
    path: str | Path,
    files,
    out: str | Path,
    *,
    gene_id_column: str = "auto",
    symbol_map: dict[str, str] | None = None,
    require_raw_counts: bool = True,
    counts_source: str = "auto",
    label_column: str | None = None,
) -> dict:
    """Check a dataset against a model before any chunk is written; write a JSON summary.

    Chooses where raw counts are read from (:func:`choose_counts_source`), checks the file's
    structure, finds the gene ids and their overlap with the model vocabulary, and checks every
    value of the counts in one streaming pass: NaN and infinite values are always refused,
    negative and non-integer ones with ``require_raw_counts``. Duplicate cell names are
    accepted (outputs keep the input's order and names) and reported. The summary says what
    was chosen and why; the log says it too. ``files`` are the model's staged files, of any
    family (:mod:`helixflow.families`), whose tokenizer matches the genes.
    """
    path = Path(path)
    source, reason = choose_counts_source(path, requested=counts_source, require_raw_counts=require_raw_counts)
    layout = inspect_h5ad(path, counts=source)
    with h5py.File(path, "r") as handle:
        # What an orchestrator decides on (e.g. whether the label column is there) without the data.
        obs_columns = [str(column) for column in handle["obs"].attrs.get("column-order", [])]
    tokenizer = load_family(files.model_name).gene_tokenizer(files, read_var(path, counts=source), gene_column=gene_id_column,
                                                             symbol_map=symbol_map, path=path)
    genes = dict(tokenizer.mapping.report, table=gene_table_key(source))
    warnings = []
    if genes["share_in_vocabulary"] < LOW_VOCABULARY_SHARE:
        warnings.append(
            f"only {genes['in_vocabulary']:,} of {genes['genes']:,} genes ({genes['share_in_vocabulary']:.0%}) of "
            f"{genes['column']} are in the vocabulary of {files.model_name}: check that they are human genes, or set "
            "gene_id_column / gene_symbol_map")
    nonzero = 0
    for first, block in iter_row_blocks(path, 0, layout.n_cells, block_size=BLOCK_CELLS, counts=source):
        nonzero += block.nnz
        check_values(path, block, first, source=source, require_raw_counts=require_raw_counts)
    duplicates = duplicate_cell_names(path)
    if duplicates["count"]:
        warnings.append(
            f"{duplicates['count']:,} cell names occur more than once (e.g. {', '.join(duplicates['examples'])}); "
            "kept as they are: every output keeps the input's cell order, so rows still line up")
    summary = {
        "input": str(path),
        "cells": layout.n_cells,
        "genes": layout.n_genes,
        "counts_source": source,
        "counts_source_reason": reason,
        "genes_in_vocabulary": tokenizer.n_vocabulary_genes,
        "gene_ids": genes,
        "x_format": layout.x_format,
        "obs_columns": obs_columns,
        "nonzero": nonzero,
        "duplicate_cell_names": duplicates["count"],
        "label_column": {"name": label_column, "present": bool(label_column) and obs_has_column(path, label_column)},
        "warnings": warnings,
        "model": files.model_name,
    }
    LOGGER.info("counts: %s (%s)", source, reason)
    LOGGER.info("gene ids: %s (%s%s); %s of %s genes in the vocabulary of %s, matched by %s", genes["column"],
                genes["holds"], ", detected" if genes["detected"] else "",
                f"{genes['in_vocabulary']:,}", f"{genes['genes']:,}", files.model_name,
                "; ".join(f"{what}: {n:,}" for what, n in genes["matched_by"].items()) or "none")
    if genes.get("version_suffixes_stripped"):  # Geneformer's Ensembl ids only
        LOGGER.info("gene ids: stripped the version suffix of %s Ensembl ids", f"{genes['version_suffixes_stripped']:,}")
    if label_column and not summary["label_column"]["present"]:
        LOGGER.info("labels: obs has no column '%s': cells are embedded, not fine-tuned on", label_column)
    for warning in warnings:
        LOGGER.warning("warning: %s", warning)
    with atomic_path(out) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def value_problem(block: sp.csr_matrix, *, require_raw_counts: bool = True) -> tuple[str, int] | None:
    """The first kind of bad value in a block and the position of its first instance, or ``None``.

    Kinds, in the order looked for: ``"NaN"``, ``"infinite"``, then, with ``require_raw_counts``,
    ``"negative"`` and ``"non-integer"``.
    """
    data = block.data
    checks = []
    if data.dtype.kind == "f":
        checks += [("NaN", np.isnan), ("infinite", np.isinf)]
    if require_raw_counts:
        checks.append(("negative", lambda values: values < 0))
        if data.dtype.kind == "f":
            checks.append(("non-integer", lambda values: np.isfinite(values) & (np.mod(values, 1) != 0)))
    for kind, test in checks:
        bad = np.flatnonzero(test(data))
        if len(bad):
            return kind, int(bad[0])
    return None


def check_values(path: Path, block: sp.csr_matrix, first_row: int, *, source: str, require_raw_counts: bool) -> None:
    """Raise a distinct, actionable error for NaN, infinite, negative or non-integer counts."""
    problem = value_problem(block, require_raw_counts=require_raw_counts)
    if problem is None:
        return
    kind, position = problem
    row = first_row + int(np.searchsorted(block.indptr, position, side="right") - 1)
    where = f"{counts_key(source)} holds {kind} values (e.g. {block.data[position]:.4g} in cell row {row})"
    if kind in ("NaN", "infinite"):
        advice = ("counts cannot be NaN or infinite, and helixflow does not guess them: fix or drop those cells, "
                  f"or read raw counts from another source with {COUNTS_OPTION}")
    else:
        advice = (f"Geneformer ranks raw counts, so ranks of these values would be wrong: read raw counts from a "
                  f"layer or .raw that holds them with {COUNTS_OPTION}, or set require_raw_counts: false "
                  "(--allow-any-values) to rank the values as they are")
    raise HelixflowError(path, f"{where}; {advice}")


def choose_counts_source(path: Path, *, requested: str = "auto", require_raw_counts: bool = True) -> tuple[str, str]:
    """Where to read raw counts from, and why: ``(source, reason)``.

    ``auto`` takes ``X`` when a sample of its first cells holds raw counts (non-negative
    integers). When it does not (normalised or log-transformed values, the CELLxGENE and scanpy
    habit), the first layer of :data:`RAW_COUNT_LAYERS`, then any other layer, then ``.raw``,
    whose sample does hold raw counts is chosen, and the reason says so. The whole chosen source
    is checked afterwards. Without ``require_raw_counts`` auto is ``X``.
    """
    if requested != "auto":
        counts_key(requested)  # a clear error for a malformed source
        return requested, "set by counts_source"
    with h5py.File(path, "r") as handle:
        available = counts_sources(handle)
    if not require_raw_counts:
        return "X", "X (require_raw_counts is false: values are ranked as they are)"
    problem = _sample_problem(path, "X") if "X" in available else "no values (the file has no X)"
    if problem is None:
        return "X", "X holds raw counts"
    layers = [source for source in available if source.startswith("layers/")]
    ordered = [f"layers/{name}" for name in RAW_COUNT_LAYERS if f"layers/{name}" in layers]
    ordered += [source for source in layers if source not in ordered] + (["raw"] if "raw" in available else [])
    for candidate in ordered:
        if _sample_problem(path, candidate) is None:
            return candidate, (f"X holds {problem}, {counts_key(candidate)} holds integer counts: chosen automatically "
                               "(set counts_source to choose another)")
    return "X", f"X holds {problem} and no layer or .raw holds raw counts"


def _sample_problem(path: Path, source: str) -> str | None:
    """What is wrong with the first cells of a source as raw counts (``None``: they look raw)."""
    try:
        layout = inspect_h5ad(path, counts=source)
        # A dense matrix is read whole row by row: fewer cells of a wide one.
        cells = max(1, min(SAMPLE_CELLS, layout.n_cells, SAMPLE_VALUES // layout.n_genes))
        _, block = next(iter_row_blocks(path, 0, cells, block_size=cells, counts=source))
    except HelixflowError:
        return "no readable matrix"
    problem = value_problem(block)
    if problem is None:
        return None
    kind, position = problem
    return f"{kind} values (e.g. {block.data[position]:.4g})"


def duplicate_cell_names(path: Path, *, examples: int = 3, block_rows: int = 100_000) -> dict:
    """How many cell names (``obs_names``) repeat an earlier one, and a few of them.

    Names are read in blocks and kept as 64-bit hashes, sorted in place (8 bytes a cell, and a
    byte a cell while repeats are counted, which the profile's
    ``memory_mb_per_million_cells.validate_input`` covers); a second pass finds the example
    names. Two different names sharing a hash (about 1 in 10^6 at ten million cells) would
    count as one repeat: this is a warning's count, and no output depends on it.
    """
    with h5py.File(path, "r") as handle:
        index = handle["obs"][handle["obs"].attrs["_index"]]

        def blocks():
            for first in range(0, index.shape[0], block_rows):
                yield first, (index.asstr()[first:first + block_rows] if index.dtype.kind in "SO"
                              else index[first:first + block_rows].astype(str).astype(object))

        hashes = np.empty(index.shape[0], dtype=np.uint64)
        for first, names in blocks():
            hashes[first:first + len(names)] = pd.util.hash_array(names)
        hashes.sort()
        repeats = hashes[1:] == hashes[:-1]
        count = int(repeats.sum())
        repeated = np.unique(hashes[1:][repeats])
        del hashes, repeats
        found: list[str] = []
        if repeated.size:
            for _, names in blocks():
                hit = np.isin(pd.util.hash_array(names), repeated)
                found.extend(name for name in dict.fromkeys(names[hit].tolist()) if name not in found)
                if len(found) >= examples:
                    break
    return {"count": count, "examples": found[:examples]}


def split_chunk(path: str | Path, out: str | Path, start: int, stop: int, *, counts: str = "X") -> Path:
    """Write cells ``start:stop`` of ``path`` (X as CSR, obs, var) to the chunk file ``out``.

    The chunk's ``X`` and ``var`` are the counts source ``counts`` and its gene table, so
    chunks are always in the canonical layout (raw counts in ``X``).
    """
    layout = inspect_h5ad(path, counts=counts)
    if not 0 <= start < stop <= layout.n_cells:
        raise HelixflowError(path, f"cell range {start}:{stop} is outside 0:{layout.n_cells}")
    with h5py.File(path, "r") as handle:
        obs = read_obs_rows(handle, start, stop)
        var = read_elem(handle[gene_table_key(counts)])
    with atomic_path(out) as partial:
        skeleton = ad.AnnData(X=sp.csr_matrix((stop - start, layout.n_genes), dtype=layout.dtype), obs=obs, var=var)
        skeleton.uns["helixflow_chunk"] = {"source": str(path), "start": start, "stop": stop, "counts": counts}
        skeleton.write_h5ad(partial)
        with h5py.File(partial, "r+") as handle:
            del handle["X"]
            for first, block in iter_row_blocks(path, start, stop, block_size=BLOCK_CELLS, counts=counts):
                if first == start:
                    write_elem(handle, "X", block)
                    matrix = sparse_dataset(handle["X"])
                else:
                    matrix.append(block)
    return Path(out)
