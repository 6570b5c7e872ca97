"""Batches of tokenized cells, read on demand from the memory-mapped chunk files.

Only the batch being built is ever copied out of the Arrow files, so training and
evaluation memory does not grow with the dataset. Batches are padded to their longest
cell, and cells of similar length are batched together, so padding stays small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helixflow.errors import HelixflowError
from helixflow.label_split import iter_label_split
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
        self.chunk_names = list(self.columns)

    def chunk_codes(self, chunks) -> np.ndarray:
        """Position of each cell's chunk among ``chunk_names`` (int32; 4 bytes a cell, not a string)."""
        codes = pd.Categorical(chunks, categories=self.chunk_names).codes.astype(np.int32)
        if (codes < 0).any():
            unknown = pd.Series(chunks)[codes < 0].iloc[0]
            raise HelixflowError(unknown, f"no tokens file for this chunk among {len(self.chunk_names)} given")
        return codes

    def cell_lengths(self, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Tokens per cell of the given ``(chunk code, row)`` pairs, one pass per chunk."""
        out = np.empty(len(rows), dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(self.chunk_names) + 1))
        for code, name in enumerate(self.chunk_names):
            cells = order[bounds[code] : bounds[code + 1]]
            out[cells] = self.lengths[name][rows[cells]]
        return out

    def cells(self, codes: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
        """Token ids of the given cells, in the order asked for."""
        return [self.columns[self.chunk_names[code]][int(row)].values.to_numpy(zero_copy_only=False)
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

    Per cell only numbers are kept (chunk code, row, target, length, position in the
    dataset): about 28 bytes a cell, so ten million cells take some 300 MB.

    Parameters
    ----------
    split
        The rows of a label split table for this part (``chunk``, ``row``, ``label``, and
        optionally ``cell_index``).
    labels
        Class names; a cell's target is the index of its label.
    store
        Where the cells' tokens are.
    """

    def __init__(self, split, labels: list[str], store: TokenStore) -> None:
        self.store = store
        self.chunk_codes = store.chunk_codes(split["chunk"])
        self.rows = split["row"].to_numpy(dtype=np.int32)
        self.lengths = store.cell_lengths(self.chunk_codes, self.rows)
        self.targets = pd.Categorical(split["label"], categories=labels).codes.astype(np.int64)
        self.cell_index = split["cell_index"].to_numpy(dtype=np.int64) if "cell_index" in split else None

    @classmethod
    def read(cls, split_path: str | Path, part: str, labels: list[str], store: TokenStore) -> LabelledCells:
        """The cells of ``part`` of a label split file, read block by block (no cell ids, no strings kept)."""
        blocks = []
        for block in iter_label_split(split_path, ["cell_index", "chunk", "row", "label", "split"]):
            block = block[block["split"] == part]
            blocks.append(pd.DataFrame({"cell_index": block["cell_index"].to_numpy(dtype=np.int64),
                                        "chunk": pd.Categorical(block["chunk"], categories=store.chunk_names),
                                        "row": block["row"].to_numpy(dtype=np.int32),
                                        "label": pd.Categorical(block["label"], categories=labels)}))
        return cls(pd.concat(blocks, ignore_index=True), labels, store)

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, positions: np.ndarray) -> list[np.ndarray]:
        """Token ids of the cells at ``positions`` of this part."""
        return self.store.cells(self.chunk_codes[positions], self.rows[positions])
