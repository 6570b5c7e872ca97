"""Geneformer rank-value encoding, vectorised over blocks of cells and written as Arrow.

The encoding is helical's ``TranscriptomeTokenizer`` (itself Geneformer's): each cell's
counts are divided by its total count, scaled to 10,000, divided by each gene's non-zero
median over the pretraining corpus; expressed genes are ranked by that value, highest
first, and the ranked gene tokens, truncated to the model's input size, are the cell's
``input_ids`` (framed by ``<cls>`` and ``<eos>`` for v2/v3 models). helixflow ranks blocks of
cells with array operations (one small sort per cell is all that is left per cell), and
writes each block to an Arrow IPC file, so memory stays flat whatever the dataset's size.

Both sort each cell with numpy's default ``argsort``; only where dataset genes are merged
(several columns for one Ensembl id) can exactly tied genes come out in another order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm import tqdm

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
    kept_column
        For each dataset gene, its column among the kept vocabulary genes, or -1.
    tokens
        Token id of each kept gene.
    medians
        Non-zero median of each kept gene.
    merges_genes
        Whether several dataset genes map to one Ensembl id (their counts are then summed).
    """

    kept_column: np.ndarray
    tokens: np.ndarray
    medians: np.ndarray
    merges_genes: bool


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
    dictionaries: tuple[dict, dict, dict],
    model_name: str,
    gene_id_column: str = "ensembl_id",
    symbol_map: dict[str, str] | None = None,
    path: Path = Path("input"),
) -> GeneMapping:
    """Map a dataset's genes to a model's vocabulary, as helical's tokenizer does.

    ``dictionaries`` are the model's token, gene-median and Ensembl-mapping dictionaries.
    """
    token_dictionary, medians, ensembl_mapping = dictionaries
    ids = dataset_gene_ids(var, gene_id_column, symbol_map, path)
    mapped = [ensembl_mapping.get(str(gene).upper()) if isinstance(gene, str) else None for gene in ids]
    mapped = [gene if gene in token_dictionary and gene in medians else None for gene in mapped]
    kept = sorted({gene for gene in mapped if gene is not None}, key=token_dictionary.get)
    if not kept:
        example = ", ".join(map(str, ids.iloc[:3]))
        raise HelixflowError(
            path,
            f"no gene of var['{gene_id_column}'] (e.g. {example}) is in the vocabulary of model "
            f"{model_name}; genes must be human Ensembl ids (ENSG...), or give gene_symbol_map",
        )
    column_of = {gene: i for i, gene in enumerate(kept)}
    kept_column = np.array([column_of[gene] if gene is not None else -1 for gene in mapped], dtype=np.int64)
    return GeneMapping(
        kept_column=kept_column,
        tokens=np.array([token_dictionary[gene] for gene in kept], dtype=np.int32),
        medians=np.array([medians[gene] for gene in kept], dtype=np.float64),
        merges_genes=bool(np.count_nonzero(kept_column >= 0) > len(kept)),
    )


def keep_vocabulary_genes(counts: sp.csr_matrix, mapping: GeneMapping) -> sp.csr_matrix:
    """Counts of the kept vocabulary genes only, summed where dataset genes share an id."""
    columns = mapping.kept_column[counts.indices]
    keep = (columns >= 0) & (counts.data != 0)
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept entries before each position
    kept = sp.csr_matrix(
        (counts.data[keep], columns[keep], kept_before[counts.indptr]),
        shape=(counts.shape[0], len(mapping.tokens)),
    )
    if mapping.merges_genes:
        kept.sum_duplicates()  # one entry per (cell, gene): summed counts
    return kept


def rank_value_encode(
    counts: sp.csr_matrix,
    mapping: GeneMapping,
    max_genes: int,
    n_counts: np.ndarray | None = None,
    threads: int = 1,
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
    threads
        Threads that rank cells in parallel.

    Returns
    -------
    tokens, offsets
        Cell ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (int32, highest first).
    """
    if n_counts is None:
        n_counts = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    kept = keep_vocabulary_genes(counts, mapping)
    cell_counts = np.repeat(n_counts, np.diff(kept.indptr))
    # Same operation order as helical, so equal inputs give bit-equal values to rank.
    descending = -(kept.data / cell_counts * TARGET_SUM / mapping.medians[kept.indices])
    gene_tokens = mapping.tokens[kept.indices]
    lengths = np.minimum(np.diff(kept.indptr), max_genes)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.empty(offsets[-1], dtype=np.int32)

    def rank_cells(cells: range) -> None:
        # numpy's default sort, as helical's: on equal values in equal order it breaks ties
        # the same way. One small sort per cell beats one two-key sort of the whole block.
        for cell in cells:
            first, last = kept.indptr[cell], kept.indptr[cell + 1]
            top = np.argsort(descending[first:last])[:max_genes]
            tokens[offsets[cell] : offsets[cell + 1]] = gene_tokens[first:last][top]

    n_cells = kept.shape[0]
    if threads > 1:  # numpy's argsort releases the GIL, so threads sort cells side by side
        bounds = np.linspace(0, n_cells, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(rank_cells, [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    else:
        rank_cells(range(n_cells))
    return tokens, offsets


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
    threads
        Threads that rank cells in parallel.
    """

    def __init__(self, files: ModelFiles, var: pd.DataFrame, gene_id_column: str = "ensembl_id",
                 symbol_map: dict[str, str] | None = None, path: Path = Path("input"), threads: int = 1) -> None:
        facts = model_facts(files.model_name)
        dictionaries = files.load_dictionaries()
        self.mapping = map_genes(var, dictionaries, files.model_name, gene_id_column, symbol_map, path)
        self.special_tokens = facts["special_tokens"]
        self.max_genes = facts["input_size"] - 2 if self.special_tokens else facts["input_size"]
        self.threads = threads
        token_dictionary = dictionaries[0]
        self.cls_token = token_dictionary.get("<cls>")
        self.eos_token = token_dictionary.get("<eos>")
        if self.special_tokens and (self.cls_token is None or self.eos_token is None):
            raise HelixflowError(files.token_dictionary, "v2/v3 models need <cls> and <eos> tokens")

    @property
    def n_vocabulary_genes(self) -> int:
        return len(self.mapping.tokens)

    def encode(self, counts: sp.csr_matrix, n_counts: np.ndarray | None = None) -> pa.RecordBatch:
        """Return one Arrow record batch (``input_ids``, ``length``) for a block of cells."""
        tokens, offsets = rank_value_encode(counts, self.mapping, self.max_genes, n_counts, self.threads)
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
    block_cells: int = 2_048,
    threads: int = 1,
    progress: bool = False,
) -> int:
    """Tokenize one chunk file into an Arrow IPC file, block by block; return the cell count.

    ``obs['n_counts']``, when present, is used as each cell's total count (helical's rule);
    otherwise the row sum of ``X``.
    """
    layout = inspect_h5ad(chunk_path)
    tokenizer = CellTokenizer(files, read_var(chunk_path), gene_id_column, symbol_map, Path(chunk_path), threads)
    bar = tqdm(total=layout.n_cells, desc="tokenize", unit="cell", mininterval=5, disable=not progress)
    with atomic_path(out) as partial, pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, ARROW_SCHEMA) as writer, bar:
        for first, block in iter_row_blocks(chunk_path, 0, layout.n_cells, block_cells):
            writer.write_batch(tokenizer.encode(block, _obs_total_counts(chunk_path, first, block.shape[0])))
            bar.update(block.shape[0])
    return layout.n_cells


def _obs_total_counts(path: str | Path, first: int, n_cells: int) -> np.ndarray | None:
    """``obs['n_counts']`` of cells ``first:first + n_cells`` if the file has that column."""
    with h5py.File(path, "r") as handle:
        if "n_counts" not in handle["obs"]:
            return None
        return read_obs_rows(handle, first, first + n_cells, ["n_counts"])["n_counts"].to_numpy(dtype=np.float64)
