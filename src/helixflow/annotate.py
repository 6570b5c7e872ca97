"""``helixflow annotate``: predict cell types of a new dataset with a fine-tuned classifier.

The dataset is read, tokenized with the classifier's own gene dictionaries and classified
block by block, so memory stays flat whatever its size. The output .h5ad holds the input's
``obs`` with two columns added: ``predicted_<label column>`` (categorical; missing for
cells without any gene in the vocabulary) and ``prediction_probability`` (the predicted
class's probability). ``X`` is left empty, as in ``embeddings.h5ad``: the counts stay in
the input file, which is never modified.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import read_elem

from helixflow.classifier import FineTunedModel, class_labels, predict_proba
from helixflow.embedding import resolve_device
from helixflow.h5ad import inspect_h5ad, iter_row_blocks, read_var
from helixflow.outputs import atomic_path
from helixflow.tokenization import CellTokenizer

BLOCK_CELLS = 10_000
PROBABILITY_COLUMN = "prediction_probability"


def annotate(
    input_path: str | Path,
    model_dir: str | Path,
    out: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    gene_id_column: str = "auto",
    symbol_map: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, str]:
    """Write ``out`` (.h5ad): the input's ``obs`` with predicted labels and probabilities.

    Returns
    -------
    obs, column
        The output's ``obs`` and the name of its predicted-label column.
    """
    if threads:
        torch.set_num_threads(threads)
    layout = inspect_h5ad(input_path)
    fine_tuned = FineTunedModel.open(model_dir)
    tokenizer = CellTokenizer(fine_tuned, read_var(input_path), gene_id_column, symbol_map, Path(input_path))
    torch_device = resolve_device(device)
    model = fine_tuned.load_model(torch_device)
    labels = class_labels(model)
    with h5py.File(input_path, "r") as handle:
        obs = read_elem(handle["obs"])
    n_counts = obs["n_counts"].to_numpy(dtype=np.float64) if "n_counts" in obs.columns else None
    codes = np.full(layout.n_cells, -1, dtype=np.int64)
    probability = np.full(layout.n_cells, np.nan, dtype=np.float32)
    for first, block in iter_row_blocks(input_path, 0, layout.n_cells, BLOCK_CELLS):
        rows = slice(first, first + block.shape[0])
        tokens = tokenizer.encode(block, None if n_counts is None else n_counts[rows])
        input_ids, lengths = tokens.column("input_ids"), tokens.column("length").to_numpy()
        probabilities = predict_proba(
            model, lambda positions: [input_ids[int(p)].values.to_numpy(zero_copy_only=False) for p in positions],
            lengths, len(labels), batch_size, torch_device, precision)
        known = np.nan_to_num(probabilities)  # cells without genes: NaN rows, no prediction
        codes[rows] = np.where(lengths > 0, known.argmax(axis=1), -1)
        probability[rows] = np.where(lengths > 0, known.max(axis=1), np.nan)
    column = f"predicted_{fine_tuned.metadata['label_column']}"
    obs[column] = pd.Categorical.from_codes(codes, categories=labels)
    obs[PROBABILITY_COLUMN] = probability
    result = ad.AnnData(X=sp.csr_matrix((layout.n_cells, 0), dtype=np.float32), obs=obs)
    result.uns["helixflow_annotation"] = {"model": str(model_dir), "base_model": fine_tuned.model_name,
                                          "mlflow_run_id": fine_tuned.metadata["mlflow_run_id"]}
    with atomic_path(out) as partial:
        result.write_h5ad(partial)
    return obs, column
