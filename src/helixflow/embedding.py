"""The ``embed`` and ``gather`` steps: cell embeddings from a Geneformer encoder.

Unlike helical's ``get_embeddings``, the masked-LM head is never computed (``BertModel``
instead of ``BertForMaskedLM``: for gf-6L-10M the head's 25k-token projection costs more than
the encoder), cells are batched by length so padding is small, and only the last hidden
state is kept. The embedding is the same: the mean of the last layer over a cell's gene
tokens, ``<cls>``/``<eos>`` left out.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import torch
from anndata.io import read_elem, write_elem
from tqdm import tqdm

from helixflow.errors import HelixflowError
from helixflow.families import FAMILIES
from helixflow.h5ad import append_obs, write_empty_matrix, write_growable_obs
from helixflow.geneformer_models import model_facts
from helixflow.model_files import ModelFiles
from helixflow.outputs import atomic_path
from helixflow.tokenization import open_tokens

EMBEDDING_KEY = FAMILIES["geneformer"].embedding_key
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HelixflowError("device", f"'{device}' was asked for but no CUDA device is visible")
    return torch.device(device)


def load_encoder(files: ModelFiles, device: torch.device):
    """Load the staged model's encoder (no masked-LM head), in eval mode, from local files only."""
    from transformers import BertModel

    files.check()
    model = BertModel.from_pretrained(files.model_dir, add_pooling_layer=False, attn_implementation="sdpa", local_files_only=True)
    return model.eval().to(device)


def embed_tokens(
    model,
    input_ids: list[np.ndarray] | object,
    lengths: np.ndarray,
    *,
    batch_size: int,
    special_tokens: bool,
    device: torch.device,
    precision: str = "fp32",
    pad_token: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Mean-pooled last-layer embeddings of tokenized cells, in input order.

    Parameters
    ----------
    input_ids
        Arrow list column (or anything indexable by row) of token ids per cell.
    lengths
        Tokens per cell.
    special_tokens
        Whether cells start with ``<cls>`` and end with ``<eos>`` (left out of the mean).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, hidden_size)`` float32; rows of cells without gene tokens are NaN.
    """
    if precision not in PRECISIONS:
        raise HelixflowError("precision", f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    n_cells = len(lengths)
    out = np.full((n_cells, model.config.hidden_size), np.nan, dtype=np.float32)
    skip = 2 if special_tokens else 0
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > skip]  # cells with no gene token keep NaN
    autocast = (
        torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
        if precision != "fp32"
        else contextlib.nullcontext()
    )
    batches = range(0, len(order), batch_size)
    with torch.inference_mode(), autocast:
        for first in tqdm(batches, desc="embed", unit="batch", disable=not progress, mininterval=5):
            rows = order[first : first + batch_size]
            batch_lengths = torch.as_tensor(lengths[rows], dtype=torch.long)
            width = int(batch_lengths.max())
            ids = torch.full((len(rows), width), pad_token, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : lengths[row]] = torch.tensor(_row(input_ids, row))
            positions = torch.arange(width)
            attention = positions[None, :] < batch_lengths[:, None]
            hidden = model(input_ids=ids.to(device), attention_mask=attention.to(device)).last_hidden_state.float()
            genes = (positions[None, :] >= skip // 2) & (positions[None, :] < (batch_lengths - skip // 2)[:, None])
            genes = genes.to(device)
            summed = (hidden * genes[..., None]).sum(dim=1)
            out[rows] = (summed / genes.sum(dim=1, keepdim=True)).cpu().numpy()
    return out


def _row(input_ids, row: int) -> np.ndarray:
    value = input_ids[int(row)]
    return value.values.to_numpy(zero_copy_only=False) if hasattr(value, "values") else np.asarray(value)


def read_tokens_and_obs(tokens_path: str | Path, chunk_path: str | Path) -> tuple[pa.Table, pd.DataFrame]:
    """A tokenized chunk (memory-mapped) and its chunk's ``obs``, checked to hold the same cells."""
    table = open_tokens(tokens_path)
    with h5py.File(chunk_path, "r") as handle:
        obs = read_elem(handle["obs"])
    if table.num_rows != len(obs):
        raise HelixflowError(tokens_path, f"holds {table.num_rows} cells but {chunk_path} holds {len(obs)}; rerun tokenize")
    return table, obs


def embed_chunk(
    tokens_path: str | Path,
    chunk_path: str | Path,
    files: ModelFiles,
    out: str | Path,
    *,
    batch_size: int,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
    progress: bool = False,
    provenance: dict | None = None,
) -> int:
    """Embed one tokenized chunk; write an .h5ad with the chunk's ``obs`` and the embeddings.

    ``provenance`` (versions and model checksums, :mod:`helixflow.provenance`) goes to
    ``uns["provenance"]``. Returns the number of cells embedded.
    """
    if threads:
        torch.set_num_threads(threads)
    table, obs = read_tokens_and_obs(tokens_path, chunk_path)
    torch_device = resolve_device(device)
    model = load_encoder(files, torch_device)
    embeddings = embed_tokens(
        model,
        table.column("input_ids").combine_chunks(),
        table.column("length").to_numpy(),
        batch_size=batch_size,
        special_tokens=model_facts(files.model_name)["special_tokens"],
        device=torch_device,
        precision=precision,
        progress=progress,
    )
    write_embedded_chunk(obs, embeddings, out, provenance=provenance)
    return len(obs)


def write_embedded_chunk(obs: pd.DataFrame, embeddings: np.ndarray, out: str | Path, *, key: str = EMBEDDING_KEY,
                         provenance: dict | None = None) -> None:
    """Write one chunk's embeddings file as ``gather`` reads it.

    The chunk's ``obs``, an empty ``X`` (cells by no genes), the ``(n_cells, hidden_size)``
    float32 embeddings in ``obsm[key]`` (the model family's key), and ``provenance`` (if any)
    in ``uns["provenance"]``.
    """
    result = ad.AnnData(X=sp.csr_matrix((len(obs), 0), dtype=np.float32), obs=obs,
                        obsm={key: np.asarray(embeddings, dtype=np.float32)},
                        uns={"provenance": provenance} if provenance else None)
    with atomic_path(out) as partial:
        result.write_h5ad(partial)


def chunk_provenance(chunk_file: str | Path) -> dict | None:
    """The provenance record an embed job wrote into its chunk file (``None`` if it wrote none)."""
    with h5py.File(chunk_file, "r") as handle:
        return read_elem(handle["uns/provenance"]) if "uns/provenance" in handle else None


def embedding_key(handle: h5py.File) -> str:
    """The ``obsm`` key of an embeddings file (a chunk's or the gathered one): its only ``obsm`` entry."""
    keys = list(handle["obsm"]) if "obsm" in handle else []
    if len(keys) != 1:
        raise HelixflowError(handle.filename, f"an embeddings file holds one obsm entry, this one {len(keys)}; rerun embed")
    return keys[0]


def gather_embeddings(chunk_files: list[str | Path], out: str | Path, metadata: dict) -> int:
    """Concatenate per-chunk embedding files into one .h5ad, one chunk at a time.

    ``obs`` and the embeddings (under the chunks' one ``obsm`` key) are appended chunk by chunk
    into the output's datasets (h5py, in anndata's on-disk layout), so memory is set by the chunk
    size, not by the number of cells. Returns the number of cells gathered.
    """
    shapes, keys = [], set()
    for path in chunk_files:
        with h5py.File(path, "r") as handle:
            key = embedding_key(handle)
            keys.add(key)
            shapes.append(handle[f"obsm/{key}"].shape)
    if len(keys) != 1:
        raise HelixflowError(chunk_files[0], f"chunks hold embeddings of different models {sorted(keys)}; rerun embed")
    key = keys.pop()
    widths = {width for _, width in shapes}
    if len(widths) != 1:
        raise HelixflowError(chunk_files[0], f"chunks hold embeddings of different widths {sorted(widths)}; rerun embed")
    n_cells = sum(cells for cells, _ in shapes)
    with atomic_path(out) as partial, h5py.File(partial, "w") as target:
        target.attrs["encoding-type"] = "anndata"
        target.attrs["encoding-version"] = "0.1.0"
        write_empty_matrix(target, "X", n_cells)
        write_elem(target, "obsm", {})
        embeddings = target["obsm"].create_dataset(key, (n_cells, widths.pop()), dtype=np.float32, chunks=True)
        embeddings.attrs["encoding-type"] = "array"
        embeddings.attrs["encoding-version"] = "0.2.0"
        first = 0
        for path in chunk_files:
            with h5py.File(path, "r") as source:
                obs = read_elem(source["obs"])  # one chunk's rows
                if first == 0:
                    write_growable_obs(target, obs)
                    write_elem(target, "var", read_elem(source["var"]))
                else:
                    append_obs(target["obs"], obs)
                embeddings[first : first + len(obs)] = source[f"obsm/{key}"][()]
            first += len(obs)
        for key in ("varm", "obsp", "varp", "layers"):
            write_elem(target, key, {})
        write_elem(target, "uns", {"helixflow": metadata})
    return n_cells
