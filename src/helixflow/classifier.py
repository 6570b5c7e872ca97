"""A Geneformer cell classifier: built from a staged model, saved as a plain transformers model.

The classifier is Geneformer's own cell-classification architecture, transformers'
``BertForSequenceClassification``: the encoder's last hidden state of the first token,
through BERT's pooler, into a linear layer over the labels. A saved classifier is an
ordinary model directory (``config.json`` with ``id2label``/``label2id``,
``model.safetensors``) that ``AutoModelForSequenceClassification.from_pretrained`` loads,
plus the base model's three gene dictionaries and ``helixflow.json`` (base model, label
column, training facts), so it can tokenize and classify a new dataset on its own.

What both families share is here too: :class:`FineTunedModel` opens either family's saved
classifier (through the family's adapter), and :func:`predict_proba` runs either classifier.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helixflow.embedding import PRECISIONS
from helixflow.errors import HelixflowError
from helixflow.model_files import DICTIONARY_FILES, ModelFiles, load_dictionaries
from helixflow.outputs import atomic_path
from helixflow.token_batches import CellTokens, Padding, inference_batches, pad_batch

METADATA_FILE = "helixflow.json"


def build_classifier(files: ModelFiles, labels: list[str], *, frozen_layers: int, seed: int):
    """A classifier over ``labels`` on the staged model's encoder, its first layers frozen.

    Parameters
    ----------
    files
        The staged base model.
    labels
        Class names; class ``i`` is ``labels[i]``.
    frozen_layers
        The embeddings and this many encoder layers, counted from the input, keep their
        pretrained weights (0: everything trains).
    seed
        Seed of the new head's initial weights.

    Notes
    -----
    Attention dropout is switched off (hidden-state dropout stays as pretrained): dropout
    on the attention weights forces PyTorch's unfused attention, which on CPU more than
    doubles the time of a training step at Geneformer's sequence lengths.
    """
    from transformers import BertForSequenceClassification

    files.check()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        files.model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
        local_files_only=True,
    )
    n_layers = model.config.num_hidden_layers
    if not 0 <= frozen_layers <= n_layers:
        raise HelixflowError("frozen_layers", f"{frozen_layers} frozen layers asked for, but {files.model_name} has {n_layers}")
    if frozen_layers:
        for module in (model.bert.embeddings, *model.bert.encoder.layer[:frozen_layers]):
            module.requires_grad_(False)
    return model


def save_classifier(state_dict: dict, config, files: ModelFiles, out: str | Path, metadata: dict) -> Path:
    """Write a trained classifier directory (atomically): weights, config, dictionaries, metadata.

    Parameters
    ----------
    state_dict
        Full (gathered) fp32 weights of a ``BertForSequenceClassification``.
    config
        Its transformers config, with the label mapping.
    files
        The staged base model whose dictionaries are copied alongside.
    metadata
        Written by :func:`write_metadata`.
    """
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(config)
    model.load_state_dict(state_dict)
    with atomic_path(out) as partial:
        model.save_pretrained(partial)
        for name in DICTIONARY_FILES:
            shutil.copy2(files.version_dir / name, partial / name)
        write_metadata(partial, files, metadata)
    return Path(out)


def load_classifier(path: Path, device: torch.device):
    """A saved Geneformer classifier in eval mode on ``device``, from local files only."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)
    return model.eval().to(device)


def write_metadata(folder: Path, files, metadata: dict) -> None:
    """Write ``helixflow.json`` into a classifier folder: ``metadata`` with the base model and its family."""
    from helixflow.families import model_family

    facts = {"base_model": files.model_name, "family": model_family(files.model_name).name, **metadata}
    (folder / METADATA_FILE).write_text(json.dumps(facts, indent=2) + "\n")


@dataclass(frozen=True)
class FineTunedModel:
    """A classifier directory written by a family adapter's ``save_classifier``.

    It offers what tokenizing with its vocabulary needs, as the family's staged files do:
    ``model_name``, ``token_dictionary`` and ``load_dictionaries()`` as
    :class:`~helixflow.model_files.ModelFiles` (Geneformer), ``load_vocabulary()`` and
    ``load_architecture()`` as :class:`~helixflow.scgpt.files.ScGPTFiles` (scGPT).
    """

    path: Path
    metadata: dict

    @classmethod
    def open(cls, path: str | Path) -> FineTunedModel:
        path = Path(path)
        if not (path / METADATA_FILE).is_file():
            raise HelixflowError(path, f"not a helixflow fine-tuned model folder (missing {METADATA_FILE})")
        model = cls(path, json.loads((path / METADATA_FILE).read_text()))
        missing = [name for name in model.family.classifier_files if not (path / name).is_file()]
        if missing:
            raise HelixflowError(path, f"not a helixflow fine-tuned model folder (missing {', '.join(missing)})")
        return model

    @property
    def model_name(self) -> str:
        return self.metadata["base_model"]

    @property
    def family(self):
        """The adapter module of the base model's family."""
        from helixflow.families import load_family

        return load_family(self.model_name)

    @property
    def token_dictionary(self) -> Path:
        return self.path / DICTIONARY_FILES[0]

    def load_dictionaries(self) -> tuple[dict, dict, dict]:
        """The Geneformer dictionaries copied from the base model, loaded without running code."""
        return load_dictionaries(self.path)

    def load_vocabulary(self) -> dict[str, int]:
        """The scGPT vocabulary copied from the base model."""
        from helixflow.scgpt.files import VOCABULARY_FILE, read_vocabulary

        return read_vocabulary(self.path / VOCABULARY_FILE)

    def load_architecture(self) -> dict:
        """The scGPT architecture and input settings written with the classifier."""
        from helixflow.scgpt.files import ARGS_FILE, read_architecture

        return read_architecture(self.path / ARGS_FILE)

    def padding(self) -> Padding:
        """What pads a batch for this classifier."""
        return self.family.padding(self)

    def load_model(self, device: torch.device):
        """The classifier in eval mode on ``device``, from local files only."""
        return self.family.load_classifier(self.path, device)


def class_labels(model) -> list[str]:
    """Class names of a classifier, in output order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def predict_proba(
    model,
    fetch: Callable[[np.ndarray], CellTokens],
    lengths: np.ndarray,
    *,
    n_classes: int,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    padding: Padding,
) -> np.ndarray:
    """Class probabilities of tokenized cells, in input order.

    Parameters
    ----------
    model
        A classifier of a family's adapter (or a DeepSpeed engine around one), in eval mode.
    fetch
        Returns the tokens of the cells at the given positions.
    lengths
        Tokens per cell; cells without tokens get NaN rows.
    n_classes
        Number of classes the model outputs.
    precision
        Autocast dtype for the forward pass (``fp32``: none).
    padding
        What pads a batch (the family adapter's ``padding``).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_classes)`` float32.
    """
    out = np.full((len(lengths), n_classes), np.nan, dtype=np.float32)
    autocast = (torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
                if precision != "fp32" else contextlib.nullcontext())
    present = np.flatnonzero(lengths > 0)
    with torch.no_grad(), autocast:
        for batch in inference_batches(lengths[present], batch_size):
            positions = present[batch]
            inputs = pad_batch(fetch(positions), padding)
            logits = model(**{name: tensor.to(device) for name, tensor in inputs.items()}).logits.float()
            out[positions] = torch.softmax(logits, dim=-1).cpu().numpy()
    return out
