"""Geneformer behind :class:`helixflow.families.FamilyAdapter`: the existing modules, unchanged.

Genes are read as Ensembl ids (or symbols mapped to them), cells rank-value encoded
(:mod:`helixflow.tokenization`) and embedded as the mean of the encoder's last layer
(:mod:`helixflow.embedding`); the classifier head is :mod:`helixflow.classifier`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from helixflow.model_files import DICTIONARY_FILES, ModelFiles

PAD_TOKEN = "<pad>"
# What a saved classifier folder holds besides its weights and helixflow.json.
classifier_files = ("config.json", *DICTIONARY_FILES)


def model_files(prefix: Path, model_name: str) -> ModelFiles:
    """Where a Geneformer model is staged under ``prefix``."""
    return ModelFiles(Path(prefix), model_name)


def stage(files: ModelFiles, source: str, *, seed: int, sha256_manifest: Path | None = None,
          base_url: str | None = None) -> None:
    """Stage from a profile's ``source`` (``helixflow model stage``); load the dictionaries to check them.

    Every source ends with the dictionaries loaded by the restricted unpickler, refusing code;
    ``staged`` only checks files already in place (air-gapped sites copy them).
    """
    from helixflow.model_files import stage_architecture, stage_download, stage_from_path, stage_synthetic

    if source == "tiny":
        stage_synthetic(files, seed=seed)
    elif source.startswith("architecture:"):
        stage_architecture(files, source.split(":", 1)[1], seed=seed)
    elif source.startswith("path:"):
        stage_from_path(files, Path(source.split(":", 1)[1]))
    elif source == "download":
        checksums = json.loads(sha256_manifest.read_text()) if sha256_manifest else None
        stage_download(files, sha256=checksums, **({"base_url": base_url} if base_url else {}))
    files.load_dictionaries()


def gene_tokenizer(files: ModelFiles, var, *, gene_column: str, symbol_map: dict | None, path: Path):
    """The tokenizer of a dataset's genes (its ``mapping.report`` says how they matched)."""
    from helixflow.tokenization import CellTokenizer

    return CellTokenizer(files, var, gene_id_column=gene_column, symbol_map=symbol_map, path=path)


def tokenize_chunk(chunk: Path, files: ModelFiles, out: Path, *, gene_column: str, symbol_map: dict | None,
                   threads: int, progress: bool) -> int:
    """Rank-value encode one chunk into an Arrow file; return its cells."""
    from helixflow.tokenization import tokenize_chunk as rank_value_tokenize

    return rank_value_tokenize(chunk, files, out, gene_id_column=gene_column, symbol_map=symbol_map, threads=threads,
                               progress=progress)


def embed_chunk(tokens: Path, chunk: Path, files: ModelFiles, out: Path, *, batch_size: int, device: str,
                precision: str, threads: int | None, progress: bool, provenance: dict | None) -> int:
    """Embed one tokenized chunk into the file ``gather`` reads; return its cells."""
    from helixflow.embedding import embed_chunk as embed_geneformer_chunk

    return embed_geneformer_chunk(tokens, chunk, files, out, batch_size=batch_size, device=device, precision=precision,
                                  threads=threads, progress=progress, provenance=provenance)


def describe(files: ModelFiles, *, batch_size: int) -> dict[str, str]:
    """The staged model as helical's own ``Geneformer`` loads it (``helixflow info``)."""
    from helixflow.model_files import helical_geneformer

    geneformer = helical_geneformer(files, batch_size=batch_size)
    config = geneformer.model.config
    n_parameters = sum(p.numel() for p in geneformer.model.parameters())
    return {
        "model status": "staged; loaded by helical.models.geneformer.Geneformer (offline)",
        "architecture": (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                         f"{config.num_attention_heads} heads, {config.max_position_embeddings} positions, "
                         f"vocabulary {config.vocab_size}, {n_parameters / 1e6:.1f}M parameters"),
        "embedding layer": f"{geneformer.layer_to_quant} ({geneformer.emb_mode} mode)",
    }


def padding(files):
    """What pads a batch (a :class:`~helixflow.token_batches.Padding`): the token dictionary's ``<pad>``.

    ``files`` is the staged model or a fine-tuned one.
    """
    from helixflow.token_batches import Padding

    token_dictionary = files.load_dictionaries()[0]
    return Padding(token_dictionary[PAD_TOKEN])


def build_classifier(files: ModelFiles, labels: list[str], *, frozen_layers: int, seed: int):
    """Geneformer's own classifier (:func:`helixflow.classifier.build_classifier`)."""
    from helixflow.classifier import build_classifier as build_bert_classifier

    return build_bert_classifier(files, labels, frozen_layers=frozen_layers, seed=seed)


def save_classifier(state_dict: dict, model, files: ModelFiles, out: Path, metadata: dict) -> Path:
    """Write the trained ``model``'s gathered ``state_dict`` as a transformers model folder."""
    from helixflow.classifier import save_classifier as save_bert_classifier

    return save_bert_classifier(state_dict, model.config, files, out, metadata)


def load_classifier(path: Path, device):
    """A classifier folder written by :func:`save_classifier`, in eval mode on ``device``."""
    from helixflow.classifier import load_classifier as load_bert_classifier

    return load_bert_classifier(path, device)
