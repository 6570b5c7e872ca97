"""Cell embeddings from tokenized scGPT chunks, in batches of cells of similar length.

The embedding is helical's ``get_embeddings`` with its default ``emb_mode="cell"``: the mean
of the transformer's output over a cell's gene positions (``<cls>`` left out), divided by its
norm; ``emb_mode="cls"`` takes the ``<cls>`` position instead. helical averages over the
padding of its batch too, so its embedding of a cell depends on the cell's batch-mates;
helixflow averages over the cell's own genes only, which is what helical gives for a cell
embedded alone (batch size 1).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from helixflow.embedding import PRECISIONS, read_tokens_and_obs, resolve_device, write_embedded_chunk
from helixflow.errors import HelixflowError
from helixflow.families import FAMILIES
from helixflow.scgpt.files import PAD_TOKEN, ScGPTFiles, build_transformer

EMBEDDING_MODES = ("cell", "cls")
# What helical's _encode reads; a checkpoint must bring all of them (helical would quietly
# leave random weights where a shape does not match).
ENCODER_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")


def load_scgpt_encoder(files: ScGPTFiles, device: torch.device) -> torch.nn.Module:
    """Load a staged scGPT model in eval mode; refuse a checkpoint without the encoder's weights.

    Keys are renamed from flash-attention's ``Wqkv.`` as helical's loader renames them; other
    heads (expression, MVC, classifier) are loaded where the checkpoint has them.
    """
    vocabulary = files.load_vocabulary()
    model = build_transformer(vocabulary, files.load_architecture())
    checkpoint = torch.load(files.weights, map_location="cpu", weights_only=True)
    checkpoint = {key.replace("Wqkv.", "in_proj_"): value for key, value in checkpoint.items()}
    expected = model.state_dict()
    unusable = [key for key, value in expected.items() if key.startswith(ENCODER_PREFIXES)
                and (key not in checkpoint or checkpoint[key].shape != value.shape)]
    if unusable:
        raise HelixflowError(files.weights, f"does not fit the model's architecture (args.json): {len(unusable)} encoder "
                                            f"weights missing or of another shape, e.g. {unusable[0]}")
    fitting = {key: value for key, value in checkpoint.items() if key in expected and value.shape == expected[key].shape}
    model.load_state_dict(fitting, strict=False)
    return model.eval().to(device)


def embed_tokens(model: torch.nn.Module, input_ids, binned_values, lengths: np.ndarray, *, batch_size: int,
                 pad_token: int, pad_value: int, device: torch.device, mode: str = "cell",
                 progress: bool = False) -> np.ndarray:
    """Normalised cell embeddings of tokenized cells, in input order.

    Parameters
    ----------
    model
        From :func:`load_scgpt_encoder`.
    input_ids, binned_values
        Arrow list columns (int32 token ids, int16 bins) per cell, ``<cls>`` first.
    lengths
        Tokens per cell.
    batch_size
        Cells per forward pass.
    pad_token, pad_value
        Token id and value that pad a batch (the model ignores positions holding ``pad_token``).
    device
        Where the model is.
    mode
        ``"cell"`` (mean over genes) or ``"cls"``.
    progress
        Whether to show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, embsize)`` float32, each row of norm 1; rows of cells without genes are NaN.
    """
    if mode not in EMBEDDING_MODES:
        raise HelixflowError("emb_mode", f"unknown scGPT embedding mode '{mode}'; use one of {', '.join(EMBEDDING_MODES)}")
    out = np.full((len(lengths), model.d_model), np.nan, dtype=np.float32)
    order = np.argsort(-lengths, kind="stable")
    order = order[lengths[order] > 1]  # <cls> alone has no gene to average
    with torch.inference_mode():
        for first in tqdm(range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress, mininterval=5):
            rows = order[first : first + batch_size]
            ids, values = _padded_batch(input_ids, binned_values, lengths, rows, pad_token=pad_token, pad_value=pad_value)
            padding = ids.eq(pad_token).to(device)
            hidden = model._encode(ids.to(device), values.to(device), src_key_padding_mask=padding).float()
            out[rows] = torch.nn.functional.normalize(pool_cells(hidden, padding, mode=mode), dim=1).cpu().numpy()
    return out


def pool_cells(hidden: torch.Tensor, padding: torch.Tensor, *, mode: str) -> torch.Tensor:
    """One vector per cell from the encoder's output: the mean over the cell's own genes, or ``<cls>``.

    Parameters
    ----------
    hidden
        ``(cells, tokens, embsize)`` encoder output, ``<cls>`` first.
    padding
        ``(cells, tokens)`` bool, true on padding.
    mode
        ``"cell"`` (mean over genes, padding and ``<cls>`` left out) or ``"cls"``.
    """
    if mode == "cls":
        return hidden[:, 0, :]
    genes = ~padding[:, 1:]
    return (hidden[:, 1:, :] * genes[..., None]).sum(dim=1) / genes.sum(dim=1, keepdim=True)


def _padded_batch(input_ids, binned_values, lengths: np.ndarray, rows: np.ndarray, *, pad_token: int,
                  pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (int64) and values (float32) of some cells, padded to the longest of them."""
    width = int(lengths[rows].max())
    ids = torch.full((len(rows), width), pad_token, dtype=torch.long)
    values = torch.full((len(rows), width), float(pad_value), dtype=torch.float32)
    for i, row in enumerate(rows):
        n = int(lengths[row])
        ids[i, :n] = torch.from_numpy(input_ids[int(row)].values.to_numpy().astype(np.int64))
        values[i, :n] = torch.from_numpy(binned_values[int(row)].values.to_numpy().astype(np.float32))
    return ids, values


def embed_token_table(files: ScGPTFiles, table, *, batch_size: int, device: torch.device, mode: str = "cell",
                      progress: bool = False) -> np.ndarray:
    """Embed the cells of one tokenized chunk (an Arrow table of :data:`~helixflow.scgpt.tokenization.ARROW_SCHEMA`)."""
    vocabulary = files.load_vocabulary()
    model = load_scgpt_encoder(files, device)
    return embed_tokens(
        model,
        table.column("input_ids").combine_chunks(),
        table.column("binned_values").combine_chunks(),
        table.column("length").to_numpy(),
        batch_size=batch_size,
        pad_token=vocabulary[PAD_TOKEN],
        pad_value=files.load_architecture()["pad_value"],
        device=device,
        mode=mode,
        progress=progress,
    )


def embed_chunk(tokens_path: str | Path, chunk_path: str | Path, files: ScGPTFiles, out: str | Path, *,
                batch_size: int, device: str = "auto", precision: str = "fp32", threads: int | None = None,
                progress: bool = False, provenance: dict | None = None) -> int:
    """Embed one tokenized chunk; write the chunk's ``obs`` and ``obsm["X_scgpt"]`` as ``gather`` reads it.

    ``precision`` other than fp32 runs the encoder under autocast; ``provenance`` goes to
    ``uns["provenance"]``. Returns the number of cells embedded.
    """
    if precision not in PRECISIONS:
        raise HelixflowError("precision", f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if threads:
        torch.set_num_threads(threads)
    table, obs = read_tokens_and_obs(tokens_path, chunk_path)
    torch_device = resolve_device(device)
    autocast = (torch.autocast(device_type=torch_device.type, dtype=PRECISIONS[precision])
                if precision != "fp32" else contextlib.nullcontext())
    with autocast:
        embeddings = embed_token_table(files, table, batch_size=batch_size, device=torch_device, progress=progress)
    write_embedded_chunk(obs, embeddings, out, key=FAMILIES["scgpt"].embedding_key, provenance=provenance)
    return len(obs)
