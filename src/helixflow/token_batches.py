"""Batches of tokenized cells, read on demand from the memory-mapped chunk files.

Only the batch being built is ever copied out of the Arrow files, so training and
evaluation memory does not grow with the dataset. Batches are padded to their longest
cell, and cells of similar length are batched together, so padding stays small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from helixflow.errors import HelixflowError
from helixflow.tokenization import open_tokens

LENGTH_WINDOW_BATCHES = 50  # training cells are length-sorted within windows of this many batches


class TokenStore:
    """The cells of tokenized chunks, addressed by chunk name and row.

    Parameters
    ----------
    paths
        Arrow files written by the ``tokenize`` step; each file's stem names its chunk.
    """

    def __init__(self, paths: list[str | Path]) -> None:
        self.columns = {}
        self.lengths = {}
        for path in paths:
            table = open_tokens(path)
            self.columns[Path(path).stem] = table.column("input_ids")
            self.lengths[Path(path).stem] = table.column("length").to_numpy()

    def cell_lengths(self, chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Tokens per cell of the given ``(chunk, row)`` pairs."""
        out = np.empty(len(rows), dtype=np.int64)
        for chunk in np.unique(chunks):
            if chunk not in self.lengths:
                raise HelixflowError(chunk, f"no tokens file for this chunk among {len(self.lengths)} given")
            mask = chunks == chunk
            out[mask] = self.lengths[chunk][rows[mask]]
        return out

    def cells(self, chunks: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        """Token ids of the given cells, in the order asked for."""
        return [self.columns[chunk][int(row)].values.to_numpy(zero_copy_only=False) for chunk, row in zip(chunks, rows)]


def pad_batch(cells: list[np.ndarray], pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences into ``input_ids`` and ``attention_mask``, padded to the longest."""
    lengths = torch.as_tensor([len(cell) for cell in cells], dtype=torch.long)
    width = int(lengths.max())
    ids = torch.full((len(cells), width), pad_token, dtype=torch.long)
    for i, cell in enumerate(cells):
        ids[i, : len(cell)] = torch.from_numpy(cell.astype(np.int64))
    attention = torch.arange(width)[None, :] < lengths[:, None]
    return ids, attention.long()


def training_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches of cell positions: shuffled, with similar lengths together.

    Cells are shuffled, sorted by length within windows of ``LENGTH_WINDOW_BATCHES``
    batches, cut into batches, and the batches shuffled. The order depends only on
    ``seed`` and ``epoch``, so a resumed run sees the batches an uninterrupted one would.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * LENGTH_WINDOW_BATCHES
    batches = []
    for first in range(0, len(order), span):
        window = order[first : first + span]
        window = window[np.argsort(-lengths[window], kind="stable")]
        batches.extend(window[i : i + batch_size] for i in range(0, len(window), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def inference_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of cell positions, longest cells first (least padding, largest batch first)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class LabelledCells:
    """One part (train or validation) of a label split, with its cells' tokens and classes.

    Parameters
    ----------
    split
        The rows of a label split table for this part (``chunk``, ``row``, ``label``).
    labels
        Class names; a cell's target is the index of its label.
    store
        Where the cells' tokens are.
    """

    def __init__(self, split, labels: list[str], store: TokenStore) -> None:
        self.chunks = split["chunk"].to_numpy()
        self.rows = split["row"].to_numpy()
        self.store = store
        self.lengths = store.cell_lengths(self.chunks, self.rows)
        self.targets = split["label"].map({label: i for i, label in enumerate(labels)}).to_numpy(dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, positions: np.ndarray) -> list[np.ndarray]:
        """Token ids of the cells at ``positions`` of this part."""
        return self.store.cells(self.chunks[positions], self.rows[positions])
