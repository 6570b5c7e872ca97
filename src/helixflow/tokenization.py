"""Geneformer rank-value encoding, vectorised over blocks of cells and written as Arrow.

The encoding is helical's ``TranscriptomeTokenizer`` (itself Geneformer's): each cell's
counts are divided by its total count, scaled to 10,000, divided by each gene's non-zero
median over the pretraining corpus; expressed genes are ranked by that value, highest
first, and the ranked gene tokens, truncated to the model's input size, are the cell's
``input_ids`` (framed by ``<cls>`` and ``<eos>`` for v2/v3 models). helixflow ranks a whole
block of cells with one sort instead of one per cell, and writes each block to an Arrow
IPC file, so memory stays flat whatever the dataset's size.

Ties are broken by gene order (a stable sort); helical's unstable ``argsort`` may order
exactly tied genes differently, the only place where the two can differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from helixflow.errors import HelixflowError
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_obs_rows, read_var
from helixflow.model_files import ModelFiles, model_facts
from helixflow.outputs import atomic_path

TARGET_SUM = 10_000.0
ARROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


@dataclass(frozen=True)
class GeneMapping:
    """How a dataset's genes (columns of ``X``) map onto a model's vocabulary.

    Attributes
    ----------
    selector
        ``(n_dataset_genes, n_kept)`` 0/1 matrix: ``X @ selector`` keeps vocabulary genes and
        sums genes that map to the same Ensembl id.
    tokens
        Token id of each kept gene.
    medians
        Non-zero median of each kept gene.
    """

    selector: sp.csr_matrix
    tokens: np.ndarray
    medians: np.ndarray


def read_symbol_map(path: str | Path) -> dict[str, str]:
    """Read a two-column table (gene symbol, Ensembl id; TSV or CSV, header optional)."""
    path = Path(path)
    if not path.is_file():
        raise HelixflowError(path, "gene symbol map not found")
    separator = "," if path.suffix == ".csv" else "\t"
    table = pd.read_csv(path, sep=separator, header=None, dtype=str, comment="#")
    if table.shape[1] < 2:
        raise HelixflowError(path, "gene symbol map needs two columns: symbol, Ensembl id")
    if not str(table.iloc[0, 1]).upper().startswith("ENS"):
        table = table.iloc[1:]  # a header row
    return dict(zip(table.iloc[:, 0], table.iloc[:, 1]))


def dataset_gene_ids(var: pd.DataFrame, gene_id_column: str, symbol_map: dict[str, str] | None, path: Path) -> pd.Series:
    """Return the Ensembl id of each dataset gene (``None`` where there is none)."""
    if gene_id_column == "index":
        genes = pd.Series(var.index.astype(str), index=var.index)
    elif gene_id_column in var.columns:
        genes = var[gene_id_column].astype("string").fillna("")
    else:
        columns = ", ".join(map(str, var.columns)) or "none"
        raise HelixflowError(
            path,
            f"no gene id column '{gene_id_column}' in var (columns: {columns}); "
            "set gene_id_column in the config, or 'index' for var_names",
        )
    if symbol_map is not None:
        genes = genes.map(symbol_map)
    return genes


def map_genes(
    var: pd.DataFrame,
    files: ModelFiles,
    gene_id_column: str = "ensembl_id",
    symbol_map: dict[str, str] | None = None,
    path: Path = Path("input"),
) -> GeneMapping:
    """Map a dataset's genes to a staged model's vocabulary, as helical's tokenizer does."""
    token_dictionary, medians, ensembl_mapping = files.load_dictionaries()
    ids = dataset_gene_ids(var, gene_id_column, symbol_map, path)
    mapped = [ensembl_mapping.get(str(gene).upper()) if isinstance(gene, str) else None for gene in ids]
    mapped = [gene if gene in token_dictionary and gene in medians else None for gene in mapped]
    kept = sorted({gene for gene in mapped if gene is not None}, key=token_dictionary.get)
    if not kept:
        example = ", ".join(map(str, ids.iloc[:3]))
        raise HelixflowError(
            path,
            f"no gene of var['{gene_id_column}'] (e.g. {example}) is in the vocabulary of model "
            f"{files.model_name}; genes must be human Ensembl ids (ENSG...), or give gene_symbol_map",
        )
    column_of = {gene: i for i, gene in enumerate(kept)}
    rows = [i for i, gene in enumerate(mapped) if gene is not None]
    cols = [column_of[mapped[i]] for i in rows]
    selector = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(mapped), len(kept))
    )
    return GeneMapping(
        selector=selector,
        tokens=np.array([token_dictionary[gene] for gene in kept], dtype=np.int32),
        medians=np.array([medians[gene] for gene in kept], dtype=np.float64),
    )


def rank_value_encode(
    counts: sp.csr_matrix,
    mapping: GeneMapping,
    max_genes: int,
    n_counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode a block of cells.

    Parameters
    ----------
    counts
        Raw counts, cells by dataset genes.
    mapping
        From :func:`map_genes`.
    max_genes
        Keep at most this many top-ranked genes per cell.
    n_counts
        Total counts per cell; defaults to the row sums over all genes (helical's rule).

    Returns
    -------
    tokens, offsets
        Cell ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (int32, highest first).
    """
    if n_counts is None:
        n_counts = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    kept = (counts @ mapping.selector).tocsr()
    kept.eliminate_zeros()
    rows = np.repeat(np.arange(kept.shape[0]), np.diff(kept.indptr))
    # Same operation order as helical, so equal inputs give bit-equal values to rank.
    values = kept.data / n_counts[rows] * TARGET_SUM / mapping.medians[kept.indices]
    order = np.lexsort((-values, rows))  # by cell, then by value, highest first
    rank = np.arange(len(order)) - kept.indptr[rows[order]]
    keep = rank < max_genes
    tokens = mapping.tokens[kept.indices[order[keep]]]
    lengths = np.minimum(np.diff(kept.indptr), max_genes)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens.astype(np.int32), offsets


def frame_special_tokens(tokens: np.ndarray, offsets: np.ndarray, cls_token: int, eos_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Put ``<cls>`` before and ``<eos>`` after every cell's tokens."""
    n_cells = len(offsets) - 1
    lengths = np.diff(offsets)
    new_offsets = offsets + 2 * np.arange(n_cells + 1)
    framed = np.empty(len(tokens) + 2 * n_cells, dtype=np.int32)
    body = np.ones(len(framed), dtype=bool)
    body[new_offsets[:-1]] = False
    body[new_offsets[1:] - 1] = False
    framed[body] = tokens
    framed[new_offsets[:-1]] = cls_token
    framed[new_offsets[1:] - 1] = eos_token
    assert np.array_equal(np.diff(new_offsets), lengths + 2)
    return framed, new_offsets


class CellTokenizer:
    """Tokenize blocks of cells for one staged Geneformer model.

    Parameters
    ----------
    files
        The staged model.
    var
        The dataset's gene table.
    gene_id_column
        Column of ``var`` with Ensembl ids (or symbols, with ``symbol_map``); ``"index"``
        for ``var_names``.
    symbol_map
        Optional symbol-to-Ensembl table, applied to that column.
    path
        The dataset, named in error messages.
    """

    def __init__(self, files: ModelFiles, var: pd.DataFrame, gene_id_column: str = "ensembl_id",
                 symbol_map: dict[str, str] | None = None, path: Path = Path("input")) -> None:
        facts = model_facts(files.model_name)
        self.mapping = map_genes(var, files, gene_id_column, symbol_map, path)
        self.special_tokens = facts["special_tokens"]
        self.max_genes = facts["input_size"] - 2 if self.special_tokens else facts["input_size"]
        token_dictionary = files.load_dictionaries()[0]
        self.cls_token = token_dictionary.get("<cls>")
        self.eos_token = token_dictionary.get("<eos>")
        if self.special_tokens and (self.cls_token is None or self.eos_token is None):
            raise HelixflowError(files.token_dictionary, "v2/v3 models need <cls> and <eos> tokens")

    @property
    def n_vocabulary_genes(self) -> int:
        return len(self.mapping.tokens)

    def encode(self, counts: sp.csr_matrix, n_counts: np.ndarray | None = None) -> pa.RecordBatch:
        """Return one Arrow record batch (``input_ids``, ``length``) for a block of cells."""
        tokens, offsets = rank_value_encode(counts, self.mapping, self.max_genes, n_counts)
        if self.special_tokens:
            tokens, offsets = frame_special_tokens(tokens, offsets, self.cls_token, self.eos_token)
        input_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens))
        return pa.RecordBatch.from_arrays([input_ids, pa.array(np.diff(offsets).astype(np.int32))], schema=ARROW_SCHEMA)


def open_tokens(path: str | Path) -> pa.Table:
    """Memory-map a tokenized chunk written by the ``tokenize`` step."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise HelixflowError(path, f"not a readable tokenized chunk ({error})") from None


def tokenize_chunk(
    chunk_path: str | Path,
    files: ModelFiles,
    out: str | Path,
    gene_id_column: str = "ensembl_id",
    symbol_map: dict[str, str] | None = None,
    block_cells: int = 10_000,
) -> int:
    """Tokenize one chunk file into an Arrow IPC file, block by block; return the cell count.

    ``obs['n_counts']``, when present, is used as each cell's total count (helical's rule);
    otherwise the row sum of ``X``.
    """
    layout = inspect_h5ad(chunk_path)
    tokenizer = CellTokenizer(files, read_var(chunk_path), gene_id_column, symbol_map, Path(chunk_path))
    with h5py.File(chunk_path, "r") as handle:
        obs_columns = read_obs_rows(handle, 0, 0).columns
    with atomic_path(out) as partial, pa.OSFile(str(partial), "wb") as sink:
        with pa.ipc.new_file(sink, ARROW_SCHEMA) as writer:
            for first, block in iter_row_blocks(chunk_path, 0, layout.n_cells, block_cells):
                n_counts = None
                if "n_counts" in obs_columns:
                    with h5py.File(chunk_path, "r") as handle:
                        rows = read_obs_rows(handle, first, first + block.shape[0])
                    n_counts = rows["n_counts"].to_numpy(dtype=np.float64)
                writer.write_batch(tokenizer.encode(block, n_counts))
    return layout.n_cells
