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
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm import tqdm

from helixflow.errors import HelixflowError
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_obs_rows, read_var
from helixflow.geneformer_models import model_facts
from helixflow.model_files import ModelFiles
from helixflow.outputs import atomic_path

TARGET_SUM = 10_000.0
ARROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


ENSEMBL_ID = re.compile(r"^(ENS[A-Z]*G\d{11})(\.\d+)?$")  # human ENSG..., mouse ENSMUSG...; optional .version
# Where public datasets keep gene ids and symbols, most common first (var_names is "index").
ID_COLUMNS = ("ensembl_id", "index", "gene_ids", "feature_id", "gene_id")
SYMBOL_COLUMNS = ("index", "feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol")
ENSEMBL_SHARE = 0.5  # a column is taken as Ensembl ids when at least this share of it looks like them
GENE_ID_OPTION = "gene_id_column (helixflow run --gene-id-column COLUMN, or 'index' for var_names)"


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
    report
        What was used and how many genes matched (:func:`resolve_gene_ids`, plus the matches).
    """

    kept_column: np.ndarray
    tokens: np.ndarray
    medians: np.ndarray
    merges_genes: bool
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GeneIds:
    """The Ensembl id of each dataset gene, and where each came from.

    Attributes
    ----------
    ids
        Ensembl id per gene, version suffix stripped (``None`` where there is none).
    sources
        Per gene: ``"ensembl id"``, ``"gene_symbol_map"``, ``"model mapping"`` or ``""``.
    column
        The ``var`` column read (``"index"`` for ``var_names``).
    kind
        ``"ensembl"`` or ``"symbol"``: what that column holds.
    detected
        Whether ``column`` was detected (``gene_id_column: auto``) rather than given.
    versions_stripped
        How many ids lost a version suffix (``ENSG00000123456.7``).
    """

    ids: np.ndarray
    sources: np.ndarray
    column: str
    kind: str
    detected: bool
    versions_stripped: int


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


def _column_values(var: pd.DataFrame, column: str) -> np.ndarray:
    values = var.index if column == "index" else var[column]
    return np.asarray(pd.Series(values).astype("string").fillna("").str.strip(), dtype=object)


def _ensembl_share(values: np.ndarray) -> float:
    return float(np.mean([bool(ENSEMBL_ID.match(value.upper())) for value in values])) if len(values) else 0.0


def _symbol_matches(values: np.ndarray, symbol_map: dict[str, str] | None, ensembl_mapping: dict) -> int:
    return sum(bool(value) and ((symbol_map is not None and value in symbol_map) or value.upper() in ensembl_mapping)
               for value in values)


def detect_gene_column(var: pd.DataFrame, *, symbol_map: dict[str, str] | None, ensembl_mapping: dict,
                       path: Path = Path("input")) -> tuple[str, str]:
    """Find the ``var`` column with gene ids: ``(column, kind)``, ``kind`` ``"ensembl"`` or ``"symbol"``.

    Ensembl ids are looked for first, in :data:`ID_COLUMNS` order (``ensembl_id``, ``var_names``,
    10x's ``gene_ids``, CELLxGENE's ``feature_id``, ``gene_id``); failing those, the symbol column
    (of :data:`SYMBOL_COLUMNS`) of which the model's mapping dictionary and ``symbol_map`` know
    the most genes.
    """
    present = [column for column in ID_COLUMNS if column == "index" or column in var.columns]
    for column in present:
        if _ensembl_share(_column_values(var, column)) >= ENSEMBL_SHARE:
            return column, "ensembl"
    candidates = [column for column in SYMBOL_COLUMNS if column == "index" or column in var.columns]
    # Then any other text column (numbers and flags cannot be symbols).
    candidates += [column for column in var.columns if column not in candidates and column not in ID_COLUMNS
                   and not pd.api.types.is_numeric_dtype(var[column]) and not pd.api.types.is_bool_dtype(var[column])]
    scored = [(_symbol_matches(_column_values(var, column), symbol_map, ensembl_mapping), column) for column in candidates]
    best_score, best = max(scored, key=lambda item: item[0]) if scored else (0, None)
    if best is None or best_score == 0:
        columns = ", ".join(map(str, var.columns)) or "none"
        example = ", ".join(map(str, var.index[:3]))
        raise HelixflowError(
            path,
            f"found no gene ids: neither var_names (e.g. {example}) nor a var column (columns: {columns}) holds "
            "Ensembl ids (ENSG...) or gene symbols that the model's ensembl_mapping_dict.pkl or a gene_symbol_map knows; "
            f"set {GENE_ID_OPTION}, or give a symbol table with gene_symbol_map (--gene-symbol-map)",
        )
    return best, "symbol"


def resolve_gene_ids(
    var: pd.DataFrame,
    ensembl_mapping: dict,
    *,
    gene_id_column: str = "auto",
    symbol_map: dict[str, str] | None = None,
    path: Path = Path("input"),
) -> GeneIds:
    """Return the Ensembl id of each dataset gene, read from ``gene_id_column`` (or the detected one).

    An Ensembl id is taken as it is, less any version suffix. Anything else is a symbol: mapped
    by ``symbol_map`` (the user's table) when it lists it, else by the model's own
    ``ensembl_mapping_dict.pkl`` (Geneformer's dictionary keys gene symbols as well as ids,
    upper-case, as helical's tokenizer reads it).
    """
    if gene_id_column == "auto":
        column, kind = detect_gene_column(var, symbol_map=symbol_map, ensembl_mapping=ensembl_mapping, path=path)
        detected = True
    elif gene_id_column == "index" or gene_id_column in var.columns:
        column, detected = gene_id_column, False
        values = _column_values(var, column)
        kind = "ensembl" if _ensembl_share(values) >= ENSEMBL_SHARE else "symbol"
    else:
        columns = ", ".join(map(str, var.columns)) or "none"
        raise HelixflowError(
            path,
            f"no gene id column '{gene_id_column}' in var (columns: {columns}); set {GENE_ID_OPTION}, "
            "or 'auto' to detect it",
        )
    values = _column_values(var, column)
    ids = np.full(len(values), None, dtype=object)
    sources = np.full(len(values), "", dtype=object)
    stripped = 0
    for i, value in enumerate(values):
        if symbol_map is not None and value in symbol_map and isinstance(symbol_map[value], str):
            value, source = symbol_map[value], "gene_symbol_map"
        else:
            source = "ensembl id"
        match = ENSEMBL_ID.match(value.upper())
        if match:
            ids[i], sources[i] = match.group(1), source
            stripped += bool(match.group(2))
        elif value and value.upper() in ensembl_mapping:
            ids[i], sources[i] = ensembl_mapping[value.upper()], "model mapping"
    return GeneIds(ids, sources, column, kind, detected, stripped)


def map_genes(
    var: pd.DataFrame,
    dictionaries: tuple[dict, dict, dict],
    *,
    model_name: str,
    gene_id_column: str = "auto",
    symbol_map: dict[str, str] | None = None,
    path: Path = Path("input"),
) -> GeneMapping:
    """Map a dataset's genes to a model's vocabulary, as helical's tokenizer does.

    ``dictionaries`` are the model's token, gene-median and Ensembl-mapping dictionaries.
    Ensembl ids pass through the mapping dictionary too (it maps retired ids to current ones).
    """
    token_dictionary, medians, ensembl_mapping = dictionaries
    genes = resolve_gene_ids(var, ensembl_mapping, gene_id_column=gene_id_column, symbol_map=symbol_map, path=path)
    mapped = [ensembl_mapping.get(gene) if gene is not None else None for gene in genes.ids]
    mapped = [gene if gene in token_dictionary and gene in medians else None for gene in mapped]
    kept = sorted({gene for gene in mapped if gene is not None}, key=token_dictionary.get)
    described = "var_names" if genes.column == "index" else f"var['{genes.column}']"
    if not kept:
        example = ", ".join(map(str, _column_values(var, genes.column)[:3]))
        raise HelixflowError(
            path,
            f"no gene of {described} (e.g. {example}) is in the vocabulary of model {model_name}; genes must be "
            f"human Ensembl ids (ENSG...) or symbols the model's mapping knows: set {GENE_ID_OPTION}, "
            "or give gene_symbol_map (--gene-symbol-map)",
        )
    in_vocabulary = np.array([gene is not None for gene in mapped])
    matched_by = pd.Series(genes.sources[in_vocabulary]).value_counts()
    report = {
        "column": described,
        "holds": "Ensembl ids" if genes.kind == "ensembl" else "gene symbols",
        "detected": genes.detected,
        "version_suffixes_stripped": genes.versions_stripped,
        "genes": len(var),
        "in_vocabulary": int(in_vocabulary.sum()),
        "share_in_vocabulary": round(float(in_vocabulary.mean()), 4),
        "matched_by": {MAPPING_SOURCES[source]: int(n) for source, n in matched_by.items()},
    }
    column_of = {gene: i for i, gene in enumerate(kept)}
    kept_column = np.array([column_of[gene] if gene is not None else -1 for gene in mapped], dtype=np.int64)
    return GeneMapping(
        kept_column=kept_column,
        tokens=np.array([token_dictionary[gene] for gene in kept], dtype=np.int32),
        medians=np.array([medians[gene] for gene in kept], dtype=np.float64),
        merges_genes=bool(np.count_nonzero(kept_column >= 0) > len(kept)),
        report=report,
    )


MAPPING_SOURCES = {
    "ensembl id": "Ensembl id in the dataset",
    "gene_symbol_map": "gene_symbol_map (user table)",
    "model mapping": "symbol via the model's ensembl_mapping_dict.pkl",
}


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
    *,
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


def frame_special_tokens(tokens: np.ndarray, offsets: np.ndarray, *, cls_token: int, eos_token: int) -> tuple[np.ndarray, np.ndarray]:
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
        Column of ``var`` with Ensembl ids or gene symbols; ``"index"`` for ``var_names``;
        ``"auto"`` to detect it (:func:`detect_gene_column`).
    symbol_map
        Optional symbol-to-Ensembl table (the user's), applied before the model's own mapping.
    path
        The dataset, named in error messages.
    threads
        Threads that rank cells in parallel.
    """

    def __init__(self, files: ModelFiles, var: pd.DataFrame, *, gene_id_column: str = "auto",
                 symbol_map: dict[str, str] | None = None, path: Path = Path("input"), threads: int = 1) -> None:
        facts = model_facts(files.model_name)
        dictionaries = files.load_dictionaries()
        self.mapping = map_genes(var, dictionaries, model_name=files.model_name, gene_id_column=gene_id_column,
                                 symbol_map=symbol_map, path=path)
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
        tokens, offsets = rank_value_encode(counts, self.mapping, max_genes=self.max_genes, n_counts=n_counts,
                                            threads=self.threads)
        if self.special_tokens:
            tokens, offsets = frame_special_tokens(tokens, offsets, cls_token=self.cls_token, eos_token=self.eos_token)
        input_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens))
        return pa.RecordBatch.from_arrays([input_ids, pa.array(np.diff(offsets).astype(np.int32))], schema=ARROW_SCHEMA)


def open_tokens(path: str | Path) -> pa.Table:
    """Memory-map a tokenized chunk written by the ``tokenize`` step."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise HelixflowError(path, f"not a readable tokenized chunk ({error})") from None


def map_token_column(path: str | Path, column: str) -> pa.ChunkedArray:
    """One column of a tokenized chunk, memory-mapped: its values are read from the file when used.

    Arrow asks the kernel to read ahead every buffer it maps, so mapping the whole table would
    bring every column of the chunk into this process's memory; only ``column``'s buffers are mapped.
    """
    try:
        source = pa.memory_map(str(path), "r")
        index = pa.ipc.open_file(source).schema.get_field_index(column)
        options = pa.ipc.IpcReadOptions(included_fields=[index])
        return pa.ipc.open_file(source, options=options).read_all().column(column)
    except (OSError, pa.ArrowInvalid, KeyError) as error:
        raise HelixflowError(path, f"not a readable tokenized chunk ({error})") from None


def read_token_column_names(path: str | Path) -> list[str]:
    """The columns of a tokenized chunk, read from the file's footer (no column's data)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).schema.names
    except (OSError, pa.ArrowInvalid) as error:
        raise HelixflowError(path, f"not a readable tokenized chunk ({error})") from None


def read_token_lengths(path: str | Path) -> np.ndarray:
    """Tokens per cell of a tokenized chunk (int32), read without touching its tokens."""
    return np.array(map_token_column(path, "length").to_numpy(), dtype=np.int32)  # a copy: the map is let go


def tokenize_chunk(
    chunk_path: str | Path,
    files: ModelFiles,
    out: str | Path,
    *,
    gene_id_column: str = "auto",
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
    tokenizer = CellTokenizer(files, read_var(chunk_path), gene_id_column=gene_id_column, symbol_map=symbol_map,
                              path=Path(chunk_path), threads=threads)
    bar = tqdm(total=layout.n_cells, desc="tokenize", unit="cell", mininterval=5, disable=not progress)
    with atomic_path(out) as partial, pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, ARROW_SCHEMA) as writer, bar:
        for first, block in iter_row_blocks(chunk_path, 0, layout.n_cells, block_size=block_cells):
            writer.write_batch(tokenizer.encode(block, _obs_total_counts(chunk_path, first, block.shape[0])))
            bar.update(block.shape[0])
    return layout.n_cells


def _obs_total_counts(path: str | Path, first: int, n_cells: int) -> np.ndarray | None:
    """``obs['n_counts']`` of cells ``first:first + n_cells`` if the file has that column."""
    with h5py.File(path, "r") as handle:
        if "n_counts" not in handle["obs"]:
            return None
        return read_obs_rows(handle, first, first + n_cells, ["n_counts"])["n_counts"].to_numpy(dtype=np.float64)
