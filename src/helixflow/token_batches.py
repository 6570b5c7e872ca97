"""Batches of tokenized cells, read on demand from the memory-mapped chunk files.

Only the batch being built is ever copied out of the Arrow files, so training and
evaluation memory does not grow with the dataset. Batches are padded to their longest
cell, and cells of similar length are batched together, so padding stays small.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from helixflow.errors import HelixflowError
from helixflow.label_split import iter_label_split
from helixflow.tokenization import map_token_column, read_token_column_names, read_token_lengths

VALUES_COLUMN = "binned_values"  # scGPT's tokens carry each gene's expression bin besides its id
LENGTH_WINDOW_BATCHES = 50  # training cells are length-sorted within windows of this many batches
SCORING_BLOCK_CELLS = 20_000  # cells scored at once: only their probabilities are held as floats


@dataclass(frozen=True)
class Padding:
    """What fills a batch beyond a cell's tokens: a token id and, for a family whose tokens carry values, a value.

    A family's adapter reads them from its staged files (``padding(files)``).
    """

    token: int
    value: int | None = None


@dataclass(frozen=True)
class CellTokens:
    """The tokens of some cells: ids and, for a family whose tokens carry values, the values (one array per cell)."""

    ids: list[np.ndarray]
    values: list[np.ndarray] | None = None


class TokenStore:
    """The cells of tokenized chunks, addressed by chunk name and row.

    Parameters
    ----------
    paths
        Arrow files written by the ``tokenize`` step; each file's stem names its chunk. Files
        with a ``binned_values`` column (scGPT's) give values with the ids.
    """

    def __init__(self, paths: list[str | Path]) -> None:
        self.paths = {Path(path).stem: path for path in paths}
        self.lengths = {name: read_token_lengths(path) for name, path in self.paths.items()}
        self.chunk_names = list(self.paths)
        self.has_values = any(VALUES_COLUMN in read_token_column_names(path) for path in paths)
        self._columns = {}  # mapped on first use: a chunk's tokens enter memory only when read

    def column(self, name: str, column: str) -> pa.ChunkedArray:
        """Column ``column`` (``input_ids`` or ``binned_values``) of chunk ``name``."""
        if (name, column) not in self._columns:
            self._columns[name, column] = map_token_column(self.paths[name], column)
        return self._columns[name, column]

    def chunk_codes(self, chunks) -> np.ndarray:
        """Position of each cell's chunk among ``chunk_names`` (int32; 4 bytes a cell, not a string)."""
        codes = pd.Categorical(chunks, categories=self.chunk_names).codes.astype(np.int32)
        if (codes < 0).any():
            unknown = pd.Series(chunks)[codes < 0].iloc[0]
            raise HelixflowError(unknown, f"no tokens file for this chunk among {len(self.chunk_names)} given")
        return codes

    def cell_lengths(self, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Tokens per cell of the given ``(chunk code, row)`` pairs, one pass per chunk."""
        out = np.empty(len(rows), dtype=np.int32)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(self.chunk_names) + 1))
        for code, name in enumerate(self.chunk_names):
            cells = order[bounds[code] : bounds[code + 1]]
            out[cells] = self.lengths[name][rows[cells]]
        return out

    def cells(self, codes: np.ndarray, rows: np.ndarray) -> CellTokens:
        """Tokens of the given cells, in the order asked for (values too where the chunks have them)."""
        names = [self.chunk_names[code] for code in codes]

        def read(column: str) -> list[np.ndarray]:
            return [self.column(name, column)[int(row)].values.to_numpy(zero_copy_only=False)
                    for name, row in zip(names, rows)]

        return CellTokens(read("input_ids"), read(VALUES_COLUMN) if self.has_values else None)


def pad_batch(cells: CellTokens, padding: Padding) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a batch of cells, padded to the longest.

    Returns
    -------
    dict
        ``input_ids`` (int64) and ``attention_mask`` (int64, 1 on a cell's tokens), and
        ``values`` (float32) when the cells carry values.
    """
    lengths = torch.as_tensor([len(cell) for cell in cells.ids], dtype=torch.long)
    width = int(lengths.max())
    attention = torch.arange(width)[None, :] < lengths[:, None]
    batch = {"input_ids": _padded(cells.ids, width, padding.token, np.int64), "attention_mask": attention.long()}
    if cells.values is not None:
        batch["values"] = _padded(cells.values, width, padding.value, np.float32)
    return batch


def _padded(arrays: list[np.ndarray], width: int, fill: int, dtype: type) -> torch.Tensor:
    """The arrays as the rows of one ``dtype`` tensor ``width`` wide, ``fill`` after each array's end."""
    out = np.full((len(arrays), width), fill, dtype=dtype)
    for i, array in enumerate(arrays):
        out[i, : len(array)] = array
    return torch.from_numpy(out)


class EpochBatches:
    """One epoch's batches of cell positions: shuffled, with similar lengths together.

    Cells are shuffled, sorted by length within windows of ``LENGTH_WINDOW_BATCHES``
    batches, cut into batches, and the batches shuffled. The order depends only on
    ``seed`` and ``epoch``, so a resumed run sees the batches an uninterrupted one would.
    The epoch is held as one array of positions (4 bytes a cell) that batches are views of.

    Parameters
    ----------
    lengths
        Tokens per cell.
    batch_size
        Cells per batch (the last batch of the epoch may be smaller).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int) -> None:
        rng = np.random.default_rng([seed, epoch])
        # Shuffling an arange in place draws what ``rng.permutation(n)`` does, in half the memory.
        self.order = np.arange(len(lengths), dtype=np.int32 if len(lengths) < 2**31 else np.int64)
        rng.shuffle(self.order)
        span = batch_size * LENGTH_WINDOW_BATCHES
        for first in range(0, len(self.order), span):
            window = self.order[first : first + span]
            window[:] = window[np.argsort(-lengths[window], kind="stable")]
        # Windows hold whole batches, so batch i of the unshuffled epoch starts at i * batch_size.
        self.batch_size = batch_size
        self.batch_order = rng.permutation(-(-len(self.order) // batch_size))

    def __len__(self) -> int:
        return len(self.batch_order)

    def __getitem__(self, index: int) -> np.ndarray:
        first = int(self.batch_order[index]) * self.batch_size
        return self.order[first : first + self.batch_size]


def inference_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of cell positions, longest cells first (least padding, largest batch first)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def scoring_blocks(n_cells: int, block_cells: int = SCORING_BLOCK_CELLS) -> Iterator[np.ndarray]:
    """Positions ``0..n_cells`` in consecutive blocks of at most ``block_cells``."""
    for first in range(0, n_cells, block_cells):
        yield np.arange(first, min(n_cells, first + block_cells))


class LabelledCells:
    """Cells of a label split, with their tokens and classes.

    Per cell only narrow numbers are kept (chunk code, row, length, target: 13 bytes a cell
    for up to 127 classes, and the position in the dataset when asked for), so ten million cells
    take some 130 MB.

    Parameters
    ----------
    store
        Where the cells' tokens are.
    chunk_codes, rows
        Each cell's chunk (its position among ``store.chunk_names``) and row in that chunk.
    lengths
        Each cell's number of tokens.
    targets
        Each cell's class (its label's position among the class names).
    cell_index
        Each cell's position in the dataset, or ``None``.
    """

    def __init__(self, store: TokenStore, chunk_codes: np.ndarray, rows: np.ndarray, lengths: np.ndarray,
                 targets: np.ndarray, cell_index: np.ndarray | None = None) -> None:
        self.store = store
        self.chunk_codes = chunk_codes.astype(np.int32, copy=False)
        self.rows = rows.astype(np.int32, copy=False)
        self.lengths = lengths.astype(np.int32, copy=False)
        self.targets = targets
        self.cell_index = cell_index

    @classmethod
    def from_split(cls, split: pd.DataFrame, labels: list[str], store: TokenStore, *,
                   with_cell_index: bool = False) -> LabelledCells:
        """The cells of some rows of a label split table (``chunk``, ``row``, ``label``; ``cell_index``).

        Targets are categorical codes (the narrowest signed integer that holds the classes; -1
        for a label that is not a class).
        """
        codes, rows = store.chunk_codes(split["chunk"]), split["row"].to_numpy(dtype=np.int32)
        return cls(store, codes, rows, store.cell_lengths(codes, rows),
                   pd.Categorical(split["label"], categories=labels).codes,
                   split["cell_index"].to_numpy(dtype=np.int64) if with_cell_index else None)

    @classmethod
    def read(cls, split_path: str | Path, part: str, labels: list[str], store: TokenStore) -> LabelledCells:
        """The cells of ``part`` of a label split file, read block by block (no cell ids, no strings kept)."""
        fields = ("chunk_codes", "rows", "lengths", "targets")
        pieces = {field: [] for field in fields}
        for block in iter_label_split(split_path, ["chunk", "row", "label", "split"]):
            cells = cls.from_split(block[block["split"] == part], labels, store)
            for field in fields:
                pieces[field].append(getattr(cells, field))
        # One field at a time, its pieces dropped once joined: the cells are held about once, not twice.
        arrays = {field: np.concatenate(pieces.pop(field)) for field in fields}
        return cls(store, **arrays)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> LabelledCells:
        """The cells at ``positions``, as their own ``LabelledCells``."""
        return LabelledCells(self.store, self.chunk_codes[positions], self.rows[positions], self.lengths[positions],
                             self.targets[positions], None if self.cell_index is None else self.cell_index[positions])

    def fetch(self, positions: np.ndarray) -> CellTokens:
        """Tokens of the cells at ``positions``."""
        return self.store.cells(self.chunk_codes[positions], self.rows[positions])
