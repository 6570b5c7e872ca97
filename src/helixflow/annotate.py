"""``helixflow annotate``: predict cell types of a new dataset with a fine-tuned classifier.

The dataset is read, tokenized with the classifier's own gene dictionaries and classified
block by block, and the output written block by block, so memory stays flat whatever its size. The output .h5ad holds the input's
``obs`` with two columns added: ``predicted_<label column>`` (categorical; missing for
cells without any gene in the vocabulary) and ``prediction_probability`` (the predicted
class's probability). ``X`` is left empty, as in ``embeddings.h5ad``: the counts stay in
the input file, which is never modified.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from anndata.io import write_elem

from helixflow.classifier import FineTunedModel, class_labels, predict_proba
from helixflow.embedding import resolve_device
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_obs_rows, read_var, write_empty_matrix
from helixflow.outputs import atomic_path
from helixflow.token_batches import VALUES_COLUMN, CellTokens

BLOCK_CELLS = 10_000
PROBABILITY_COLUMN = "prediction_probability"


def annotate(
    input_path: str | Path,
    model_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    gene_id_column: str = "auto",
    symbol_map: dict[str, str] | None = None,
) -> tuple[pd.Series, str]:
    """Write ``out`` (.h5ad): the input's ``obs`` with predicted labels and probabilities.

    The input's ``obs`` is copied by HDF5 (no table in memory) and the two new columns are
    written block by block, so memory is set by ``BLOCK_CELLS``, not by the dataset's size.

    Returns
    -------
    counts, column
        Cells per predicted label (NaN: cells without any vocabulary gene), and the name of
        the predicted-label column.
    """
    if threads:
        torch.set_num_threads(threads)
    layout = inspect_h5ad(input_path)
    fine_tuned = FineTunedModel.open(model_dir)
    tokenizer = fine_tuned.family.gene_tokenizer(fine_tuned, read_var(input_path), gene_column=gene_id_column,
                                                 symbol_map=symbol_map, path=Path(input_path))
    padding = fine_tuned.padding()
    torch_device = resolve_device(device)
    model = fine_tuned.load_model(torch_device)
    labels = class_labels(model)
    column = f"predicted_{fine_tuned.metadata['label_column']}"
    per_label = np.zeros(len(labels) + 1, dtype=np.int64)  # the last: no prediction
    with atomic_path(out) as partial, h5py.File(input_path, "r") as source, h5py.File(partial, "w") as target:
        target.attrs["encoding-type"] = "anndata"
        target.attrs["encoding-version"] = "0.1.0"
        write_empty_matrix(target, "X", layout.n_cells)
        source.copy(source["obs"], target, name="obs")
        obs = target["obs"]
        order = [name for name in obs.attrs["column-order"] if name not in (column, PROBABILITY_COLUMN)]
        for name in (column, PROBABILITY_COLUMN):
            if name in obs:  # an input annotated before: replaced
                del obs[name]
        obs.attrs["column-order"] = [*order, column, PROBABILITY_COLUMN]
        write_elem(obs, column, pd.Categorical([], categories=labels))  # the categorical's layout, codes to fill
        del obs[column]["codes"]
        codes = obs[column].create_dataset("codes", (layout.n_cells,), dtype=np.int16 if len(labels) > 127 else np.int8)
        codes.attrs["encoding-type"] = "array"
        codes.attrs["encoding-version"] = "0.2.0"
        probability = obs.create_dataset(PROBABILITY_COLUMN, (layout.n_cells,), dtype=np.float32)
        probability.attrs["encoding-type"] = "array"
        probability.attrs["encoding-version"] = "0.2.0"
        counted = "n_counts" in source["obs"]
        for first, block in iter_row_blocks(input_path, 0, layout.n_cells, block_size=BLOCK_CELLS):
            rows = slice(first, first + block.shape[0])
            n_counts = read_obs_rows(source, rows.start, rows.stop, ["n_counts"])["n_counts"].to_numpy(dtype=np.float64) if counted else None
            tokens = tokenizer.encode(block, n_counts)
            lengths = tokens.column("length").to_numpy()
            probabilities = predict_proba(model, lambda positions: block_cells(tokens, positions), lengths,
                                          n_classes=len(labels), batch_size=batch_size, device=torch_device,
                                          precision=precision, padding=padding)
            known = np.nan_to_num(probabilities)  # cells without genes: NaN rows, no prediction
            predicted = np.where(lengths > 0, known.argmax(axis=1), -1)
            codes[rows] = predicted
            probability[rows] = np.where(lengths > 0, known.max(axis=1), np.nan)
            per_label += np.bincount(np.where(predicted < 0, len(labels), predicted), minlength=len(labels) + 1)
        write_elem(target, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(target, key, {})
        write_elem(target, "uns", {"helixflow_annotation": {"model": str(model_dir), "base_model": fine_tuned.model_name,
                                                            "mlflow_run_id": fine_tuned.metadata["mlflow_run_id"]}})
    counts = pd.Series(per_label, index=pd.Index([*labels, np.nan], name=column), name="cells")
    return counts, column


def block_cells(tokens, positions: np.ndarray) -> CellTokens:
    """The tokens of some cells of a tokenized block (an Arrow record batch), values too where it has them."""

    def cells(column: str) -> list[np.ndarray]:
        return [tokens.column(column)[int(p)].values.to_numpy(zero_copy_only=False) for p in positions]

    return CellTokens(cells("input_ids"), cells(VALUES_COLUMN) if VALUES_COLUMN in tokens.schema.names else None)
