"""An scGPT cell classifier: the staged encoder and a linear head on its pooled cell embedding.

The encoder is helical's ``TransformerModel`` loaded as the embed step loads it
(:func:`~helixflow.scgpt.embedding.load_scgpt_encoder`), with the decoders it does not need
for a cell's embedding (expression, MVC, its own classifier) dropped. A cell's vector is the
embed step's pooling (:func:`~helixflow.scgpt.embedding.pool_cells`: the mean of the
encoder's output over the cell's own genes), before the embed step's normalisation, and a
linear layer maps it to the classes.

A saved classifier folder holds ``model.safetensors``, ``classifier.json`` (classes and
pooling), the base model's ``vocab.json`` and its ``args.json`` (architecture and input
settings, written in full), and ``helixflow.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from helixflow.classifier import write_metadata
from helixflow.errors import HelixflowError
from helixflow.outputs import atomic_path
from helixflow.scgpt.embedding import load_scgpt_encoder, pool_cells
from helixflow.scgpt.files import (ARGS_FILE, CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE, VOCABULARY_FILE,
                                   ScGPTFiles, build_transformer, read_architecture, read_vocabulary)

POOLING = "cell"  # the embed step's emb_mode
UNUSED_DECODERS = ("decoder", "mvc_decoder", "cls_decoder")  # pretraining heads, not read by _encode


@dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier adds to its encoder: the classes, in output order, and the pooling.

    ``num_labels`` and ``id2label`` read as a transformers config's do.
    """

    labels: tuple[str, ...]
    pooling: str = POOLING

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))


class ScGPTClassifier(torch.nn.Module):
    """scGPT's encoder and a linear head over the classes.

    Parameters
    ----------
    transformer
        helical's ``TransformerModel`` with its weights; only its encoder part is kept.
    config
        Classes and pooling.
    """

    def __init__(self, transformer: torch.nn.Module, config: ClassifierConfig) -> None:
        super().__init__()
        for name in UNUSED_DECODERS:
            setattr(transformer, name, None)  # not trained, not saved
        self.transformer = transformer
        self.config = config
        self.head = torch.nn.Linear(transformer.d_model, config.num_labels)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor,
                attention_mask: torch.Tensor) -> SequenceClassifierOutput:
        """Logits of a padded batch (:func:`helixflow.token_batches.pad_batch`'s keyword arguments)."""
        padding = attention_mask.eq(0)
        # Under DeepSpeed bf16 the weights are bf16 and nothing casts the float inputs for them.
        values = values.to(self.head.weight.dtype)
        hidden = self.transformer._encode(input_ids, values, src_key_padding_mask=padding)
        return SequenceClassifierOutput(logits=self.head(pool_cells(hidden, padding, mode=self.config.pooling)))


def freeze_layers(model: ScGPTClassifier, frozen_layers: int) -> None:
    """Keep the pretrained weights of the gene and value encoders and of the first ``frozen_layers`` layers."""
    layers = model.transformer.transformer_encoder.layers
    if not 0 <= frozen_layers <= len(layers):
        raise HelixflowError("frozen_layers", f"{frozen_layers} frozen layers asked for, but the scGPT model has {len(layers)}")
    if frozen_layers:
        for module in (model.transformer.encoder, model.transformer.value_encoder, *layers[:frozen_layers]):
            module.requires_grad_(False)


def build_classifier(files: ScGPTFiles, labels: list[str], *, frozen_layers: int, seed: int) -> ScGPTClassifier:
    """A classifier over ``labels`` on the staged encoder, its first layers frozen.

    Parameters
    ----------
    files
        The staged base model.
    labels
        Class names; class ``i`` is ``labels[i]``.
    frozen_layers
        The gene and value encoders and this many transformer layers, counted from the
        input, keep their pretrained weights (0: everything trains).
    seed
        Seed of the head's initial weights.
    """
    transformer = load_scgpt_encoder(files, torch.device("cpu"))
    torch.manual_seed(seed)
    model = ScGPTClassifier(transformer, ClassifierConfig(tuple(labels)))
    freeze_layers(model, frozen_layers)
    return model


def save_classifier(state_dict: dict, model: ScGPTClassifier, files: ScGPTFiles, out: str | Path,
                    metadata: dict) -> Path:
    """Write a trained classifier folder (atomically): weights, classes, vocabulary, architecture, metadata.

    Parameters
    ----------
    state_dict
        Full (gathered) fp32 weights of ``model``.
    model
        The classifier trained (its config is written).
    files
        The staged base model: its vocabulary and architecture are written alongside.
    metadata
        Written by :func:`helixflow.classifier.write_metadata`.
    """
    from safetensors.torch import save_file

    with atomic_path(out) as partial:
        partial.mkdir(parents=True)
        save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, partial / CLASSIFIER_WEIGHTS_FILE)
        (partial / CLASSIFIER_CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        shutil.copy2(files.vocabulary, partial / VOCABULARY_FILE)
        (partial / ARGS_FILE).write_text(json.dumps(files.load_architecture(), indent=1) + "\n")
        write_metadata(partial, files, metadata)
    return Path(out)


def load_classifier(path: Path, device: torch.device) -> ScGPTClassifier:
    """A classifier folder written by :func:`save_classifier`, in eval mode on ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    saved = json.loads((path / CLASSIFIER_CONFIG_FILE).read_text())
    config = ClassifierConfig(tuple(saved["labels"]), saved["pooling"])
    transformer = build_transformer(read_vocabulary(path / VOCABULARY_FILE), read_architecture(path / ARGS_FILE))
    model = ScGPTClassifier(transformer, config)
    model.load_state_dict(load_file(path / CLASSIFIER_WEIGHTS_FILE))
    return model.eval().to(device)
