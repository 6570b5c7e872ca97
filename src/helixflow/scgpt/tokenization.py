"""scGPT tokenization of one chunk: gene symbols to token ids, expression to per-cell bins, Arrow out.

The encoding is what helical 2.2.0's ``scGPT`` feeds its transformer in ``get_embeddings``
(``process_data``, its ``Dataset`` and its ``DataCollator``): a cell's expressed genes whose
symbol is in the vocabulary, in the dataset's column order; each raw count replaced by its
bin among the cell's own non-zero counts (quantile edges, ties spread by seeded draws);
``<cls>`` in front with the pad value (-2) as its value; cells longer than the maximum
length (1,200 with ``<cls>``) sampled by a seeded permutation. Each cell's result depends on
that cell only (helical reseeds both draws for every cell), so helixflow encodes blocks of
cells and writes each block to an Arrow IPC file, whatever the batch helical would have used.

Two cases differ from helical on purpose: a cell with no expressed vocabulary gene (helical
fails on it) becomes ``<cls>`` alone, and two columns with one symbol each keep their own
token (as scGPT's own code does; helical 2.2.0 then misaligns genes and counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import torch
from tqdm import tqdm

from helixflow.errors import HelixflowError
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_var
from helixflow.outputs import atomic_path
from helixflow.scgpt.files import CLS_TOKEN, ScGPTFiles
from helixflow.tokenization import SYMBOL_COLUMNS

LOGGER = logging.getLogger(__name__)

ARROW_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("binned_values", pa.list_(pa.int16())), ("length", pa.int32())]
)
BINNING_SEED = 42  # helical's _digitize draws from a fresh default_rng(42) for every cell
SAMPLING_SEED = 0  # helical's collator permutes with a fresh torch Generator seeded 0 for every cell
GENE_COLUMN_OPTION = "gene_column (a var column of gene symbols, or 'index' for var_names)"


@dataclass(frozen=True)
class SymbolMapping:
    """How a dataset's genes (columns of ``X``) map onto an scGPT vocabulary.

    Attributes
    ----------
    token_of_column
        Token id of each dataset gene, -1 where its symbol is not in the vocabulary (int32).
    report
        The column read and how many genes matched.
    """

    token_of_column: np.ndarray
    report: dict = field(default_factory=dict)


def column_symbols(var: pd.DataFrame, column: str) -> np.ndarray:
    """The values of a ``var`` column (``"index"``: ``var_names``) as strings, unchanged otherwise.

    Symbols are matched exactly, as helical matches them (no case folding, no trimming).
    """
    values = var.index if column == "index" else var[column]
    return np.asarray(pd.Series(values).astype("string").fillna(""), dtype=object)


def detect_symbol_column(var: pd.DataFrame, vocabulary: dict[str, int], *, path: Path = Path("input")) -> str:
    """Return the ``var`` column (or ``"index"``) with the most symbols in the vocabulary."""
    candidates = ["index"] + [column for column in SYMBOL_COLUMNS if column != "index" and column in var.columns]
    candidates += [column for column in var.columns if column not in candidates
                   and (pd.api.types.is_string_dtype(var[column]) or isinstance(var[column].dtype, pd.CategoricalDtype))]
    matches = {column: sum(symbol in vocabulary for symbol in column_symbols(var, column)) for column in candidates}
    best = max(candidates, key=matches.get)
    if matches[best] == 0:
        columns = ", ".join(map(str, var.columns)) or "none"
        raise HelixflowError(
            path,
            f"no gene symbol of var_names or of a var column (columns: {columns}) is in the scGPT vocabulary; "
            f"set {GENE_COLUMN_OPTION}",
        )
    return best


def map_symbols(var: pd.DataFrame, vocabulary: dict[str, int], *, gene_column: str = "auto",
                path: Path = Path("input")) -> SymbolMapping:
    """Map each dataset gene to its vocabulary token by its symbol, as helical's ``process_data`` does.

    Parameters
    ----------
    var
        The dataset's gene table.
    vocabulary
        The model's ``vocab.json``.
    gene_column
        The ``var`` column of gene symbols, ``"index"`` for ``var_names``, or ``"auto"``
        for the one with most symbols in the vocabulary.
    path
        The dataset, named in error messages.
    """
    detected = gene_column == "auto"
    if detected:
        gene_column = detect_symbol_column(var, vocabulary, path=path)
    elif gene_column != "index" and gene_column not in var.columns:
        columns = ", ".join(map(str, var.columns)) or "none"
        raise HelixflowError(path, f"no gene column '{gene_column}' in var (columns: {columns}); set {GENE_COLUMN_OPTION}")
    symbols = column_symbols(var, gene_column)
    token_of_column = np.array([vocabulary.get(symbol, -1) for symbol in symbols], dtype=np.int32)
    in_vocabulary = token_of_column >= 0
    described = "var_names" if gene_column == "index" else f"var['{gene_column}']"
    if not in_vocabulary.any():
        example = ", ".join(symbols[:3])
        raise HelixflowError(path, f"no gene of {described} (e.g. {example}) is in the scGPT vocabulary; set {GENE_COLUMN_OPTION}")
    repeated = int(in_vocabulary.sum() - len(np.unique(token_of_column[in_vocabulary])))
    if repeated:
        LOGGER.warning("%s: %d genes repeat a symbol of another column; each keeps its own token", path, repeated)
    report = {
        "column": described,
        "holds": "gene symbols",  # what scGPT's vocabulary is keyed by
        "detected": detected,
        "genes": len(var),
        "in_vocabulary": int(in_vocabulary.sum()),
        "share_in_vocabulary": round(float(in_vocabulary.mean()), 4),
        "repeated_symbols": repeated,
        "matched_by": {"gene symbol in the scGPT vocabulary": int(in_vocabulary.sum())},
    }
    return SymbolMapping(token_of_column=token_of_column, report=report)


def vocabulary_counts(counts: sp.csr_matrix, token_of_column: np.ndarray) -> sp.csr_matrix:
    """The non-zero counts of vocabulary genes, columns still the dataset's, in column order per cell."""
    counts = sp.csr_matrix(counts)
    if not counts.has_sorted_indices:
        counts = counts.sorted_indices()  # helical walks a dense row, so genes come in column order
    keep = (token_of_column[counts.indices] >= 0) & (counts.data != 0)
    kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept entries before each position
    return sp.csr_matrix((counts.data[keep], counts.indices[keep], kept_before[counts.indptr]), shape=counts.shape)


def bin_cell(counts: np.ndarray, *, n_bins: int, draws: np.ndarray) -> np.ndarray:
    """Bin one cell's non-zero counts among themselves, as scGPT's ``binning`` does.

    Edges are the cell's quantiles at ``n_bins - 1`` even steps; a count is given the bin
    ``numpy.digitize`` places it in, and a count equal to several (tied) edges one of those
    bins at random, by ``draws``.

    Parameters
    ----------
    counts
        The cell's non-zero counts, float32 (helical bins its float32 tensor).
    n_bins
        51 in helical's collator.
    draws
        At least ``len(counts)`` uniform draws; helical's are ``default_rng(42).random(len(counts))``.

    Returns
    -------
    numpy.ndarray
        The bins, int16.
    """
    edges = np.quantile(counts, np.linspace(0, 1, n_bins - 1))
    lowest = np.digitize(counts, edges)
    highest_tied = np.digitize(counts, edges, right=True)
    bins = np.ceil(draws[: len(counts)] * (highest_tied - lowest) + lowest)
    return bins.astype(np.int16)


def sampled_genes(n_genes: int, *, max_genes: int) -> np.ndarray:
    """Positions of the genes kept from a cell longer than the model takes, in helical's order."""
    generator = torch.Generator().manual_seed(SAMPLING_SEED)
    return torch.randperm(n_genes, generator=generator)[:max_genes].numpy()


class ScGPTTokenizer:
    """Tokenize blocks of cells for one staged scGPT model.

    Parameters
    ----------
    files
        The staged model.
    var
        The dataset's gene table.
    gene_column
        Column of ``var`` with gene symbols, ``"index"`` for ``var_names``, or ``"auto"``.
    path
        The dataset, named in error messages.
    """

    def __init__(self, files: ScGPTFiles, var: pd.DataFrame, *, gene_column: str = "auto",
                 path: Path = Path("input")) -> None:
        vocabulary = files.load_vocabulary()
        settings = files.load_architecture()
        self.mapping = map_symbols(var, vocabulary, gene_column=gene_column, path=path)
        self.cls_token = vocabulary[CLS_TOKEN]
        self.cls_value = settings["pad_value"]  # helical gives <cls> the pad value
        self.max_length = settings["max_seq_len"]
        self.n_bins = settings["n_bins"]

    @property
    def n_vocabulary_genes(self) -> int:
        """Distinct vocabulary genes of the dataset."""
        tokens = self.mapping.token_of_column
        return len(np.unique(tokens[tokens >= 0]))

    def encode(self, counts: sp.csr_matrix, n_counts: np.ndarray | None = None) -> pa.RecordBatch:
        """Return one Arrow record batch (``input_ids``, ``binned_values``, ``length``) for a block of cells.

        ``n_counts`` (cells' totals) is taken as Geneformer's tokenizer takes it and not read:
        bins rank a cell's counts among themselves, so a cell's total changes none.
        """
        kept = vocabulary_counts(counts, self.mapping.token_of_column)
        n_genes = np.diff(kept.indptr)
        lengths = np.minimum(n_genes + 1, self.max_length)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        input_ids = np.empty(offsets[-1], dtype=np.int32)
        binned_values = np.empty(offsets[-1], dtype=np.int16)
        input_ids[offsets[:-1]] = self.cls_token
        binned_values[offsets[:-1]] = self.cls_value
        tokens = self.mapping.token_of_column[kept.indices]
        values = kept.data.astype(np.float32)  # helical's Dataset hands the collator float32
        # helical draws afresh per cell; a longer draw from the same seed starts with the same numbers.
        draws = np.random.default_rng(BINNING_SEED).random(int(n_genes.max(initial=0)))
        for cell in np.flatnonzero(n_genes):
            first, last = kept.indptr[cell], kept.indptr[cell + 1]
            cell_tokens = tokens[first:last]
            cell_bins = bin_cell(values[first:last], n_bins=self.n_bins, draws=draws)
            if n_genes[cell] + 1 > self.max_length:
                keep = sampled_genes(n_genes[cell], max_genes=self.max_length - 1)
                cell_tokens, cell_bins = cell_tokens[keep], cell_bins[keep]
            input_ids[offsets[cell] + 1 : offsets[cell + 1]] = cell_tokens
            binned_values[offsets[cell] + 1 : offsets[cell + 1]] = cell_bins
        if not n_genes.all():
            LOGGER.warning("%d cells express no vocabulary gene: each is <cls> alone", int((n_genes == 0).sum()))
        return pa.RecordBatch.from_arrays(
            [
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(input_ids)),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(binned_values)),
                pa.array(lengths.astype(np.int32)),
            ],
            schema=ARROW_SCHEMA,
        )


def tokenize_chunk(chunk_path: str | Path, files: ScGPTFiles, out: str | Path, *, gene_column: str = "auto",
                   block_cells: int = 2_048, progress: bool = False) -> int:
    """Tokenize one chunk file for scGPT into an Arrow IPC file, block by block; return the cell count."""
    layout = inspect_h5ad(chunk_path)
    tokenizer = ScGPTTokenizer(files, read_var(chunk_path), gene_column=gene_column, path=Path(chunk_path))
    LOGGER.info("%s: genes matched %s", chunk_path, tokenizer.mapping.report)
    bar = tqdm(total=layout.n_cells, desc="tokenize", unit="cell", mininterval=5, disable=not progress)
    with atomic_path(out) as partial, pa.OSFile(str(partial), "wb") as sink, \
            pa.ipc.new_file(sink, ARROW_SCHEMA) as writer, bar:
        for _, block in iter_row_blocks(chunk_path, 0, layout.n_cells, block_size=block_cells):
            writer.write_batch(tokenizer.encode(block))
            bar.update(block.shape[0])
    return layout.n_cells
