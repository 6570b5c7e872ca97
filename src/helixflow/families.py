"""Model families: each declared once, with the module that stages, tokenizes and embeds for it.

A profile's ``model_name`` fixes its family (:func:`model_family`). The facts here are light
(standard library only: the Airflow DAG loads profiles through this module); the work is done
by each family's adapter module, imported on demand by :func:`load_family`, which provides
what :class:`FamilyAdapter` lists.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from helixflow.errors import HelixflowError
from helixflow.geneformer_models import GENEFORMER_MODELS

SCGPT_MODEL_NAME = "best_model"  # helical 2.2.0's scGPTConfig model_name, its only scGPT checkpoint


@dataclass(frozen=True)
class Family:
    """One model family: its models, where its embeddings go and who implements it.

    Parameters
    ----------
    name
        The family's name, as :func:`model_family` returns it.
    models
        helical model names of the family (a profile's ``model_name``).
    embedding_key
        The ``obsm`` key of its cell embeddings.
    adapter
        The module implementing :class:`FamilyAdapter`.
    """

    name: str
    models: tuple[str, ...]
    embedding_key: str
    adapter: str


FAMILIES = {family.name: family for family in (
    Family("geneformer", tuple(GENEFORMER_MODELS), "X_geneformer", "helixflow.geneformer_family"),
    Family("scgpt", (SCGPT_MODEL_NAME,), "X_scgpt", "helixflow.scgpt.family"),
)}


class FamilyAdapter(Protocol):
    """What a family's adapter module provides to the steps (``helixflow step ...``, ``model stage``).

    ``files`` is the object :meth:`model_files` returns: it has ``model_name``, ``model_dir``,
    ``version`` (helical's folder of the model), ``ready_file`` (present once staged),
    ``check()``, ``staged_paths()`` (file name under the models folder to path, for checksums)
    and ``vocabulary_names`` (names of the files that tokenization reads).
    """

    def model_files(self, prefix: Path, model_name: str): ...

    def stage(self, files, source: str, *, seed: int, sha256_manifest: Path | None = None,
              base_url: str | None = None) -> None: ...

    def gene_tokenizer(self, files, var, *, gene_column: str, symbol_map: dict | None, path: Path): ...

    def tokenize_chunk(self, chunk: Path, files, out: Path, *, gene_column: str, symbol_map: dict | None,
                       threads: int, progress: bool) -> int: ...

    def embed_chunk(self, tokens: Path, chunk: Path, files, out: Path, *, batch_size: int, device: str,
                    precision: str, threads: int | None, progress: bool, provenance: dict | None) -> int: ...

    def describe(self, files, *, batch_size: int) -> dict[str, str]: ...

    # Fine-tuning. ``classifier_files``: what a saved classifier folder holds besides
    # helixflow.json; a classifier's forward takes pad_batch's keyword arguments and
    # returns an object with ``logits``.
    classifier_files: tuple[str, ...]

    def padding(self, files): ...

    def build_classifier(self, files, labels: list[str], *, frozen_layers: int, seed: int): ...

    def save_classifier(self, state_dict: dict, model, files, out: Path, metadata: dict) -> Path: ...

    def load_classifier(self, path: Path, device): ...


def model_family(model_name: str) -> Family:
    """The family of a helical model name; a clear error for a name no family knows."""
    for family in FAMILIES.values():
        if model_name in family.models:
            return family
    known = "; ".join(f"{family.name}: {', '.join(family.models)}" for family in FAMILIES.values())
    raise HelixflowError(model_name, f"not a model helixflow knows; known models: {known}")


def load_family(model_name: str) -> FamilyAdapter:
    """The adapter module of a model's family (imports the family's code)."""
    return importlib.import_module(model_family(model_name).adapter)
