"""Batches of tokenized cells, read on demand from the memory-mapped chunk files.

Only the batch being built is ever copied out of the Arrow files, so training and
evaluation memory does not grow with the dataset. Batches are padded to their longest
cell, and cells of similar length are batched together, so padding stays small.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from helixflow.errors import HelixflowError
from helixflow.label_split import iter_label_split
from helixflow.tokenization import open_tokens, read_token_lengths

LENGTH_WINDOW_BATCHES = 50  # training cells are length-sorted within windows of this many batches
SCORING_BLOCK_CELLS = 20_000  # cells scored at once: only their probabilities are held as floats


class TokenStore:
    """The cells of tokenized chunks, addressed by chunk name and row.

    Parameters
    ----------
    paths
        Arrow files written by the ``tokenize`` step; each file's stem names its chunk.
    """

    def __init__(self, paths: list[str | Path]) -> None:
        self.paths = {Path(path).stem: path for path in paths}
        self.lengths = {name: read_token_lengths(path) for name, path in self.paths.items()}
        self.chunk_names = list(self.paths)
        self._input_ids = {}  # mapped on first use: a chunk's token ids enter memory only when read

    def input_ids(self, name: str) -> pa.ChunkedArray:
        """The token ids column of chunk ``name``."""
        if name not in self._input_ids:
            self._input_ids[name] = open_tokens(self.paths[name]).column("input_ids")
        return self._input_ids[name]

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

    def cells(self, codes: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        """Token ids of the given cells, in the order asked for."""
        return [self.input_ids(self.chunk_names[code])[int(row)].values.to_numpy(zero_copy_only=False)
                for code, row in zip(codes, rows)]


def pad_batch(cells: list[np.ndarray], pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences into ``input_ids`` and ``attention_mask``, padded to the longest."""
    lengths = torch.as_tensor([len(cell) for cell in cells], dtype=torch.long)
    width = int(lengths.max())
    ids = torch.full((len(cells), width), pad_token, dtype=torch.long)
    for i, cell in enumerate(cells):
        ids[i, : len(cell)] = torch.from_numpy(cell.astype(np.int64))
    attention = torch.arange(width)[None, :] < lengths[:, None]
    return ids, attention.long()


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

    def fetch(self, positions: np.ndarray) -> list[np.ndarray]:
        """Token ids of the cells at ``positions``."""
        return self.store.cells(self.chunk_codes[positions], self.rows[positions])
