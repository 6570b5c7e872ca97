"""The ``label_split`` step: which labelled cells train a classifier and which validate it.

The split is stratified by label (each label keeps its share of validation cells), drawn
from a seed so the same inputs and seed give the same split, and written as a table with
one row per cell of the dataset, so every later step (fine-tuning, evaluation, the linear
probe) uses exactly the same cells.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem

from helixflow.errors import HelixflowError
from helixflow.outputs import atomic_path
from helixflow.tokenization import read_token_lengths

TRAIN, VALIDATION, EXCLUDED = "train", "validation", "excluded"
SPLIT_COLUMNS = ["cell_index", "cell_id", "chunk", "row", "label", "split"]
SPLIT_DTYPES = {"cell_id": str, "chunk": str, "label": "string", "split": str}
BLOCK_ROWS = 100_000  # rows of the table read at once (their strings are the transient cost)


def read_chunk_labels(chunk_path: str | Path, label_column: str) -> pd.DataFrame:
    """Return ``cell_id`` and ``label`` (string, missing as NA) of one chunk's cells."""
    with h5py.File(chunk_path, "r") as handle:
        obs = handle["obs"]
        columns = [key for key in obs.keys() if not key.startswith("_")]
        if label_column not in obs:
            raise HelixflowError(
                chunk_path,
                f"no obs column '{label_column}' to fine-tune on (columns: {', '.join(columns) or 'none'}); "
                "set label_column, or finetune: {enabled: false}",
            )
        labels = pd.Series(read_elem(obs[label_column]))
        index = read_elem(obs[obs.attrs["_index"]])
    return pd.DataFrame({"cell_id": np.asarray(index, dtype=str), "label": labels.astype("string").to_numpy()})


def validation_count(n_cells: int, validation_fraction: float) -> int:
    """Validation cells of a label with ``n_cells`` cells: rounded, at least one from two cells on."""
    return 0 if n_cells < 2 else max(1, round(validation_fraction * n_cells))


def write_label_split(
    chunk_paths: list[str | Path],
    tokens_paths: list[str | Path],
    out: str | Path,
    *,
    label_column: str,
    validation_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """Split the cells of all chunks, stratified by label; write the table (TSV), chunk by chunk.

    Cells without a label, or without any gene in the model's vocabulary (nothing to
    classify), are marked ``excluded``. Each label keeps ``validation_count`` of its cells for
    validation, drawn uniformly at random: a first pass counts each label's cells, the second
    decides chunk by chunk how many of the label's validation cells fall in this chunk (a
    hypergeometric draw, which makes the whole draw uniform) and which ones. Memory is set by
    the chunk size and the number of labels, never by the number of cells.

    Returns
    -------
    pandas.DataFrame
        Cells per ``label`` and ``split`` (label NA for excluded cells).
    """
    if len(chunk_paths) != len(tokens_paths):
        raise HelixflowError(out, f"{len(chunk_paths)} chunk files but {len(tokens_paths)} token files")
    counts: dict[str, int] = {}
    for chunk_path, tokens_path in zip(chunk_paths, tokens_paths):
        for label, n in _chunk_cells(chunk_path, tokens_path, label_column)["label"].value_counts().items():
            counts[label] = counts.get(label, 0) + int(n)
    if len(counts) < 2:
        raise HelixflowError(chunk_paths[0], f"obs['{label_column}'] has {len(counts)} label(s) among cells with genes; a classifier needs at least 2")
    labels = sorted(counts)
    remaining = {label: [counts[label], validation_count(counts[label], validation_fraction)] for label in labels}
    rng = np.random.default_rng(seed)
    summary: dict[tuple, int] = {}
    first_cell = 0
    with atomic_path(out) as partial:
        for chunk_path, tokens_path in zip(chunk_paths, tokens_paths):
            cells = _chunk_cells(chunk_path, tokens_path, label_column)
            split = np.full(len(cells), EXCLUDED, dtype=object)
            values = cells["label"].to_numpy(dtype=object, na_value=None)
            for label in labels:
                members = np.flatnonzero(values == label)
                if not len(members):
                    continue
                cells_left, validation_left = remaining[label]
                chosen = draw_uniform(rng, len(members), cells_left, validation_left)
                split[members] = np.where(chosen, VALIDATION, TRAIN)
                remaining[label] = [cells_left - len(members), validation_left - int(chosen.sum())]
            cells.insert(0, "cell_index", np.arange(first_cell, first_cell + len(cells)))
            cells.insert(2, "chunk", Path(chunk_path).stem)
            cells.insert(3, "row", np.arange(len(cells)))
            cells["split"] = split
            cells[SPLIT_COLUMNS].to_csv(partial, sep="\t", index=False, mode="a", header=first_cell == 0)
            for key, n in cells.groupby(["label", "split"], dropna=False).size().items():
                summary[key] = summary.get(key, 0) + int(n)
            first_cell += len(cells)
    return pd.DataFrame([(label, part, n) for (label, part), n in sorted(summary.items(), key=str)],
                        columns=["label", "split", "cells"])


def draw_uniform(rng: np.random.Generator, n_block: int, n_left: int, wanted_left: int) -> np.ndarray:
    """Which of the next ``n_block`` of ``n_left`` items to take, ``wanted_left`` being still to take.

    Drawn block after block, the items taken are a uniform random subset of exactly the
    wanted size: each block's share is hypergeometric, its members uniform within the block.
    """
    drawn = int(rng.hypergeometric(wanted_left, n_left - wanted_left, n_block)) if n_block else 0
    chosen = np.zeros(n_block, dtype=bool)
    chosen[rng.choice(n_block, size=drawn, replace=False)] = True
    return chosen


def _chunk_cells(chunk_path: str | Path, tokens_path: str | Path, label_column: str) -> pd.DataFrame:
    """One chunk's ``cell_id`` and ``label``; NA for cells without any vocabulary gene."""
    cells = read_chunk_labels(chunk_path, label_column)
    lengths = read_token_lengths(tokens_path)
    if len(lengths) != len(cells):
        raise HelixflowError(tokens_path, f"holds {len(lengths)} cells but {chunk_path} holds {len(cells)}; rerun tokenize")
    cells.loc[lengths == 0, "label"] = pd.NA
    return cells


def iter_label_split(path: str | Path, columns: list[str] | None = None, *, block_rows: int = BLOCK_ROWS) -> Iterator[pd.DataFrame]:
    """Read a table written by :func:`write_label_split` in blocks of ``block_rows`` rows.

    ``columns``, when given, are the only ones read (``cell_id`` is the costly one).
    """
    try:
        with open(path) as handle:
            header = handle.readline().rstrip("\n").split("\t")
        missing = set(SPLIT_COLUMNS) - set(header)
        if missing:
            raise HelixflowError(path, f"not a label split: missing columns {', '.join(sorted(missing))}")
        yield from pd.read_csv(path, sep="\t", dtype=SPLIT_DTYPES, keep_default_na=False, na_values={"label": [""]},
                               usecols=columns, chunksize=block_rows)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise HelixflowError(path, f"not a readable label split ({error})") from None


def read_label_split(path: str | Path) -> pd.DataFrame:
    """Read a whole table written by :func:`write_label_split` (small ones: see :func:`iter_label_split`)."""
    return pd.concat(list(iter_label_split(path)), ignore_index=True)


def class_names(split_path: str | Path) -> list[str]:
    """The labels a classifier learns: those of train cells, sorted."""
    names = set()
    for block in iter_label_split(split_path, ["label", "split"]):
        names.update(block.loc[block["split"] == TRAIN, "label"].unique())
    return sorted(names)
