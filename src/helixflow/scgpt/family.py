"""scGPT behind :class:`helixflow.families.FamilyAdapter`.

Genes are read by symbol (a ``var`` column, detected or given), each cell's counts binned
among themselves (:mod:`helixflow.scgpt.tokenization`), and cells embedded as the normalised
mean of the encoder's output over their own genes (:mod:`helixflow.scgpt.embedding`); the
classifier is a linear head on that mean (:mod:`helixflow.scgpt.classifier`).
"""

from __future__ import annotations

from pathlib import Path

from helixflow.errors import HelixflowError
from helixflow.scgpt.files import (ARGS_FILE, CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE, VOCABULARY_FILE,
                                   ScGPTFiles)

# What a saved classifier folder holds besides helixflow.json.
classifier_files = (CLASSIFIER_WEIGHTS_FILE, CLASSIFIER_CONFIG_FILE, VOCABULARY_FILE, ARGS_FILE)
SYMBOL_MAP_UNUSED = "gene_symbol_map maps symbols to Ensembl ids for Geneformer; scGPT reads gene symbols themselves"


def model_files(prefix: Path, model_name: str) -> ScGPTFiles:
    """Where the scGPT model is staged under ``prefix`` (helical 2.2.0 has one, so the name fixes nothing)."""
    return ScGPTFiles(Path(prefix))


def stage(files: ScGPTFiles, source: str, *, seed: int, sha256_manifest: Path | None = None,
          base_url: str | None = None) -> None:
    """Stage from a profile's ``source``: ``tiny``, ``architecture:tiny|real``, ``path:<folder>`` or ``staged``.

    Every source ends with the vocabulary read and checked.
    """
    from helixflow.scgpt.files import stage_from_path, stage_synthetic

    if source == "tiny":
        stage_synthetic(files, seed=seed)
    elif source.startswith("architecture:"):
        stage_synthetic(files, architecture=source.split(":", 1)[1], seed=seed)
    elif source.startswith("path:"):
        stage_from_path(files, Path(source.split(":", 1)[1]))
    elif source == "download":
        raise HelixflowError(files.model_dir, "scGPT files are not downloaded by helixflow yet: copy helical's "
                                              "scgpt/scGPT_CP folder (vocab.json, best_model.pt) and stage it with --from")
    files.load_vocabulary()


def _refuse_symbol_map(symbol_map: dict | None) -> None:
    if symbol_map is not None:
        raise HelixflowError("gene_symbol_map", SYMBOL_MAP_UNUSED)


def gene_tokenizer(files: ScGPTFiles, var, *, gene_column: str, symbol_map: dict | None, path: Path):
    """The tokenizer of a dataset's genes (its ``mapping.report`` says how they matched)."""
    from helixflow.scgpt.tokenization import ScGPTTokenizer

    _refuse_symbol_map(symbol_map)
    return ScGPTTokenizer(files, var, gene_column=gene_column, path=path)


def tokenize_chunk(chunk: Path, files: ScGPTFiles, out: Path, *, gene_column: str, symbol_map: dict | None,
                   threads: int, progress: bool) -> int:
    """Tokenize one chunk into an Arrow file (one thread: binning is per cell and cheap); return its cells."""
    from helixflow.scgpt.tokenization import tokenize_chunk as bin_tokenize

    _refuse_symbol_map(symbol_map)
    return bin_tokenize(chunk, files, out, gene_column=gene_column, progress=progress)


def embed_chunk(tokens: Path, chunk: Path, files: ScGPTFiles, out: Path, *, batch_size: int, device: str,
                precision: str, threads: int | None, progress: bool, provenance: dict | None) -> int:
    """Embed one tokenized chunk into the file ``gather`` reads; return its cells."""
    from helixflow.scgpt.embedding import embed_chunk as embed_scgpt_chunk

    return embed_scgpt_chunk(tokens, chunk, files, out, batch_size=batch_size, device=device, precision=precision,
                             threads=threads, progress=progress, provenance=provenance)


def describe(files: ScGPTFiles, *, batch_size: int) -> dict[str, str]:
    """The staged model as helical's own ``scGPT`` loads it (``helixflow info``)."""
    from helixflow.scgpt.files import helical_scgpt

    scgpt = helical_scgpt(files, batch_size=batch_size)
    architecture = files.load_architecture()
    n_parameters = sum(p.numel() for p in scgpt.model.parameters())
    return {
        "model status": "staged; loaded by helical.models.scgpt.scGPT (offline)",
        "architecture": (f"{architecture['nlayers']} layers, embsize {architecture['embsize']}, "
                         f"{architecture['nheads']} heads, at most {architecture['max_seq_len']} tokens a cell, "
                         f"vocabulary {len(scgpt.vocab)}, {n_parameters / 1e6:.1f}M parameters"),
        "embedding": f"{scgpt.config['emb_mode']} mode",
    }


def padding(files):
    """What pads a batch (a :class:`~helixflow.token_batches.Padding`): ``<pad>`` and args.json's ``pad_value``.

    ``files`` is the staged model or a fine-tuned one.
    """
    from helixflow.scgpt.files import PAD_TOKEN
    from helixflow.token_batches import Padding

    return Padding(files.load_vocabulary()[PAD_TOKEN], files.load_architecture()["pad_value"])


def build_classifier(files: ScGPTFiles, labels: list[str], *, frozen_layers: int, seed: int):
    """The encoder and a linear head (:func:`helixflow.scgpt.classifier.build_classifier`)."""
    from helixflow.scgpt.classifier import build_classifier as build_scgpt_classifier

    return build_scgpt_classifier(files, labels, frozen_layers=frozen_layers, seed=seed)


def save_classifier(state_dict: dict, model, files: ScGPTFiles, out: Path, metadata: dict) -> Path:
    """Write the trained ``model``'s gathered ``state_dict`` with the vocabulary and architecture."""
    from helixflow.scgpt.classifier import save_classifier as save_scgpt_classifier

    return save_scgpt_classifier(state_dict, model, files, out, metadata)


def load_classifier(path: Path, device):
    """A classifier folder written by :func:`save_classifier`, in eval mode on ``device``."""
    from helixflow.scgpt.classifier import load_classifier as load_scgpt_classifier

    return load_scgpt_classifier(path, device)
