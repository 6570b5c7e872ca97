"""scGPT model files in helical's cache layout: staging, checking and offline loading.

helical 2.2.0 keeps its one scGPT model (the continual-pretraining checkpoint) under
``<prefix>/.cache/helical/models/scgpt/scGPT_CP/`` as ``vocab.json`` (gene symbol and
special token to token id) and ``best_model.pt`` (a plain ``state_dict``), with
``<prefix>`` taken from ``CACHE_DIR_HELICAL_PREFIX``. helical reads the architecture from
its ``scGPTConfig`` (12 layers, width 512 by default), not from the files. A model staged by
helixflow also carries ``args.json`` (the file scGPT's own releases ship, with the
architecture keys scGPT names them by), so a smaller test model can be loaded with the
right shape; a folder without it has helical's default architecture.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from helixflow import synthetic
from helixflow.errors import HelixflowError
from helixflow.families import SCGPT_MODEL_NAME
from helixflow.outputs import atomic_path

LOGGER = logging.getLogger(__name__)

MODEL_FOLDER = "scGPT_CP"  # helical 2.2.0's only scGPT checkpoint
VOCABULARY_FILE = "vocab.json"
WEIGHTS_FILE = f"{SCGPT_MODEL_NAME}.pt"
ARGS_FILE = "args.json"
# A fine-tuned classifier's own files (helixflow.scgpt.classifier), beside vocab.json and args.json.
CLASSIFIER_CONFIG_FILE = "classifier.json"
CLASSIFIER_WEIGHTS_FILE = "model.safetensors"
# scGPT's vocabularies end with these, after the genes (<eoc>: end of cell, unused for embedding).
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
# The real checkpoint's vocabulary size (60,694 genes and the three special tokens).
REAL_VOCABULARY_GENES = 60_694

# Architectures by name; keys as in scGPT's args.json and helical's scGPTConfig. "real" is
# the released checkpoint's shape (helical's scGPTConfig defaults), for benchmarks.
ARCHITECTURES: dict[str, dict] = {
    "tiny": {"nlayers": 2, "nheads": 4, "embsize": 32, "d_hid": 64, "n_layers_cls": 3, "dropout": 0.2},
    "real": {"nlayers": 12, "nheads": 8, "embsize": 512, "d_hid": 512, "n_layers_cls": 3, "dropout": 0.2},
}
# What the model is fed: helical's scGPTConfig values (pad_value, mask_value, MAX_LENGTH) and
# its DataCollator's fixed number of expression bins.
INPUT_SETTINGS = {"pad_token": PAD_TOKEN, "pad_value": -2, "mask_value": -1, "max_seq_len": 1200, "n_bins": 51}
TINY_GENES = 2_000


@dataclass(frozen=True)
class ScGPTFiles:
    """Where one staged scGPT model lives in helical's cache layout.

    Parameters
    ----------
    prefix
        The folder that plays ``CACHE_DIR_HELICAL_PREFIX``.
    """

    prefix: Path

    model_name = SCGPT_MODEL_NAME
    version = MODEL_FOLDER
    vocabulary_names = (VOCABULARY_FILE,)  # what tokenization reads

    @property
    def model_dir(self) -> Path:
        return Path(self.prefix) / ".cache" / "helical" / "models" / "scgpt" / MODEL_FOLDER

    @property
    def ready_file(self) -> Path:
        """A file of the model folder, which is staged whole: present once the model is."""
        return self.weights

    @property
    def vocabulary(self) -> Path:
        return self.model_dir / VOCABULARY_FILE

    @property
    def weights(self) -> Path:
        return self.model_dir / WEIGHTS_FILE

    @property
    def args(self) -> Path:
        return self.model_dir / ARGS_FILE

    def check(self) -> None:
        """Raise a clear error unless the vocabulary and the weights are staged."""
        missing = [path.name for path in (self.vocabulary, self.weights) if not path.is_file()]
        if missing:
            raise HelixflowError(
                self.model_dir,
                f"scGPT model is not staged (missing {', '.join(missing)}); run 'helixflow model stage' first",
            )

    def staged_paths(self) -> dict[str, Path]:
        """The staged files by their path under the models folder (``scgpt/scGPT_CP/...``)."""
        self.check()
        base = self.model_dir.parent.parent
        return {path.relative_to(base).as_posix(): path for path in sorted(self.model_dir.iterdir())
                if path.is_file() and not path.name.startswith(".")}

    def load_vocabulary(self) -> dict[str, int]:
        """Return the vocabulary (gene symbol or special token to token id), checked."""
        self.check()
        return read_vocabulary(self.vocabulary)

    def load_architecture(self) -> dict:
        """Return the architecture and input settings: ``args.json`` over helical's defaults."""
        return read_architecture(self.args)


def read_architecture(path: Path) -> dict:
    """The architecture and input settings of an ``args.json`` (helical's defaults where it has none, or is absent)."""
    settings = {**ARCHITECTURES["real"], **INPUT_SETTINGS}
    if Path(path).is_file():
        try:
            staged = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise HelixflowError(path, f"not a readable args.json ({error})") from None
        settings.update({key: staged[key] for key in settings if key in staged})
    return settings


def read_vocabulary(path: Path) -> dict[str, int]:
    """Read a ``vocab.json``: an object of token to distinct non-negative id, with ``<pad>`` and ``<cls>``."""
    try:
        vocabulary = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise HelixflowError(path, f"not a readable scGPT vocabulary ({error})") from None
    if not isinstance(vocabulary, dict) or not all(
        isinstance(token, str) and isinstance(index, int) and index >= 0 for token, index in vocabulary.items()
    ):
        raise HelixflowError(path, "an scGPT vocabulary maps each token (a string) to a non-negative integer id")
    if len(set(vocabulary.values())) != len(vocabulary):
        raise HelixflowError(path, "two tokens of the scGPT vocabulary share an id")
    missing = [token for token in (PAD_TOKEN, CLS_TOKEN) if token not in vocabulary]
    if missing:
        raise HelixflowError(path, f"the scGPT vocabulary lacks {', '.join(missing)}")
    return vocabulary


def synthetic_vocabulary(n_genes: int) -> dict[str, int]:
    """Gene symbols of :mod:`helixflow.synthetic` first, then scGPT's special tokens, as scGPT orders them."""
    tokens = list(synthetic.gene_symbols(n_genes)) + list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}


def build_transformer(vocabulary: dict[str, int], architecture: dict):
    """Return helical's scGPT ``TransformerModel`` with an architecture, as helical's loader builds it."""
    from helical.models.scgpt.model_dir import TransformerModel

    return TransformerModel(
        ntoken=len(vocabulary),
        d_model=architecture["embsize"],
        nhead=architecture["nheads"],
        d_hid=architecture["d_hid"],
        nlayers=architecture["nlayers"],
        nlayers_cls=architecture["n_layers_cls"],
        n_cls=1,
        vocab=vocabulary,
        dropout=architecture["dropout"],
        pad_token=architecture["pad_token"],
        pad_value=architecture["pad_value"],
        do_mvc=True,  # helical 2.2.0's load_model builds the checkpoint's MVC decoder too
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        pre_norm=False,
    )


def stage_synthetic(files: ScGPTFiles, *, architecture: str = "tiny", n_genes: int | None = None, seed: int = 0) -> None:
    """Write a randomly initialised scGPT model in helical's layout.

    Parameters
    ----------
    files
        Where to stage.
    architecture
        A name of :data:`ARCHITECTURES`: ``"tiny"`` for tests, ``"real"`` for benchmarks.
    n_genes
        Genes in the vocabulary; 2,000 for ``tiny``, the real vocabulary's 60,694 otherwise.
    seed
        Seed of the random weights.
    """
    import torch

    if architecture not in ARCHITECTURES:
        raise HelixflowError(architecture, f"no scGPT architecture of that name; known: {', '.join(ARCHITECTURES)}")
    n_genes = n_genes or (TINY_GENES if architecture == "tiny" else REAL_VOCABULARY_GENES)
    settings = {**ARCHITECTURES[architecture], **INPUT_SETTINGS}
    vocabulary = synthetic_vocabulary(n_genes)
    torch.manual_seed(seed)
    model = build_transformer(vocabulary, settings)
    args = {**settings, "origin": "helixflow synthetic model", "architecture": architecture, "seed": seed}
    # The model folder appears last and whole, so a staged model is complete or absent.
    with atomic_path(files.model_dir) as model_dir:
        model_dir.mkdir(parents=True)
        (model_dir / VOCABULARY_FILE).write_text(json.dumps(vocabulary))
        (model_dir / ARGS_FILE).write_text(json.dumps(args, indent=1))
        torch.save(model.state_dict(), model_dir / WEIGHTS_FILE)
    LOGGER.info("staged a %s scGPT model (%d genes) in %s", architecture, n_genes, files.model_dir)


def stage_from_path(files: ScGPTFiles, source: Path) -> None:
    """Stage from a folder holding ``vocab.json`` and ``best_model.pt`` (and ``args.json``, if any), checked first.

    The vocabulary is read before anything is staged; the staged files are the source's bytes.
    """
    source = Path(source)
    missing = [name for name in (VOCABULARY_FILE, WEIGHTS_FILE) if not (source / name).is_file()]
    if missing:
        raise HelixflowError(source, f"not an scGPT model folder: missing {', '.join(missing)}")
    read_vocabulary(source / VOCABULARY_FILE)
    with atomic_path(files.model_dir) as model_dir:
        model_dir.mkdir(parents=True)
        for name in (VOCABULARY_FILE, WEIGHTS_FILE, ARGS_FILE):
            if (source / name).is_file():
                shutil.copy2(source / name, model_dir / name)
    LOGGER.info("staged the scGPT model of %s in %s", source, files.model_dir)


def helical_scgpt(files: ScGPTFiles, *, batch_size: int = 24, device: str = "cpu", **config):
    """Construct helical's own ``scGPT`` from staged files, with no network access.

    helical's constructor asks its ``Downloader`` to check each file against S3; here the
    configuration points at the staged weights (helical reads ``vocab.json`` beside them)
    and lists nothing to download. The architecture comes from :meth:`ScGPTFiles.load_architecture`.
    helical reads ``best_model.pt`` with ``torch.load(weights_only=True)``, which runs no code.
    """
    from helical.models.scgpt import scGPT, scGPTConfig

    files.load_vocabulary()
    architecture = files.load_architecture()
    shape = {key: architecture[key] for key in ARCHITECTURES["real"]}
    configurer = scGPTConfig(batch_size=batch_size, device=device, pad_value=architecture["pad_value"],
                             mask_value=architecture["mask_value"], **{**shape, **config})
    configurer.config["model_path"] = files.weights
    configurer.config["list_of_files_to_download"] = []
    configurer.config["MAX_LENGTH"] = architecture["max_seq_len"]
    return scGPT(configurer)
