"""The ``label_split`` step: which labelled cells train a classifier and which validate it.

The split is stratified by label (each label keeps its share of validation cells), drawn
from a seed so the same inputs and seed give the same split, and written as a table with
one row per cell of the dataset, so every later step (fine-tuning, evaluation, the linear
probe) uses exactly the same cells.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from anndata.io import read_elem

from helixflow.errors import HelixflowError
from helixflow.outputs import atomic_path
from helixflow.tokenization import open_tokens

TRAIN, VALIDATION, EXCLUDED = "train", "validation", "excluded"
SPLIT_COLUMNS = ["cell_index", "cell_id", "chunk", "row", "label", "split"]


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


def stratified_split(labels: pd.Series, validation_fraction: float, seed: int) -> np.ndarray:
    """Assign each labelled cell to train or validation, label by label.

    Parameters
    ----------
    labels
        One label per cell; NA marks cells that take no part.
    validation_fraction
        Share of each label's cells held out (rounded; at least one when a label has two
        or more cells, none when it has one).
    seed
        Seed of the draw.

    Returns
    -------
    numpy.ndarray
        ``"train"``, ``"validation"`` or ``"excluded"`` (no label) per cell.
    """
    split = np.full(len(labels), EXCLUDED, dtype=object)
    rng = np.random.default_rng(seed)
    values = labels.to_numpy(dtype=object, na_value=None)
    for label in sorted({value for value in values if value is not None}):
        members = np.flatnonzero(values == label)
        members = members[rng.permutation(len(members))]
        n_validation = 0 if len(members) < 2 else max(1, round(validation_fraction * len(members)))
        split[members[:n_validation]] = VALIDATION
        split[members[n_validation:]] = TRAIN
    return split


def write_label_split(
    chunk_paths: list[str | Path],
    tokens_paths: list[str | Path],
    out: str | Path,
    label_column: str,
    validation_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """Split the cells of all chunks; write the table (TSV) and return it.

    Cells without a label, or without any gene in the model's vocabulary (nothing to
    classify), are marked ``excluded``.
    """
    if len(chunk_paths) != len(tokens_paths):
        raise HelixflowError(out, f"{len(chunk_paths)} chunk files but {len(tokens_paths)} token files")
    parts = []
    for chunk_path, tokens_path in zip(chunk_paths, tokens_paths):
        cells = read_chunk_labels(chunk_path, label_column)
        lengths = open_tokens(tokens_path).column("length").to_numpy()
        if len(lengths) != len(cells):
            raise HelixflowError(tokens_path, f"holds {len(lengths)} cells but {chunk_path} holds {len(cells)}; rerun tokenize")
        cells.loc[lengths == 0, "label"] = pd.NA
        cells.insert(1, "chunk", Path(chunk_path).stem)
        cells.insert(2, "row", np.arange(len(cells)))
        parts.append(cells)
    table = pd.concat(parts, ignore_index=True)
    table.insert(0, "cell_index", np.arange(len(table)))
    table["split"] = stratified_split(table["label"], validation_fraction, seed)
    counts = table.loc[table["split"] != EXCLUDED, "label"].value_counts()
    if len(counts) < 2:
        raise HelixflowError(chunk_paths[0], f"obs['{label_column}'] has {len(counts)} label(s) among cells with genes; a classifier needs at least 2")
    with atomic_path(out) as partial:
        table[SPLIT_COLUMNS].to_csv(partial, sep="\t", index=False)
    return table


def read_label_split(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_label_split`."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"cell_id": str, "chunk": str, "label": "string", "split": str},
                            keep_default_na=False, na_values={"label": [""]})
    except (OSError, pd.errors.ParserError) as error:
        raise HelixflowError(path, f"not a readable label split ({error})") from None
    missing = set(SPLIT_COLUMNS) - set(table.columns)
    if missing:
        raise HelixflowError(path, f"not a label split: missing columns {', '.join(sorted(missing))}")
    return table


def class_names(split: pd.DataFrame) -> list[str]:
    """The labels a classifier learns: those of train cells, sorted."""
    return sorted(split.loc[split["split"] == TRAIN, "label"].unique())
