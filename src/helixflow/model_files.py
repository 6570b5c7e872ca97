"""Geneformer model files in helical's cache layout: staging, checking and offline loading.

helical 2.2.0 keeps each model under
``<prefix>/.cache/helical/models/geneformer/<version>/`` (the three dictionaries) and
``.../<version>/<model_name>/`` (``config.json``, weights, ``training_args.bin``), with
``<prefix>`` taken from ``CACHE_DIR_HELICAL_PREFIX``. helixflow stages files into that
layout once (from a folder, an archive, a checked download, or a generated test model) and
never touches the network afterwards.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from helixflow import synthetic
from helixflow.errors import HelixflowError
from helixflow.geneformer_models import model_facts
from helixflow.outputs import atomic_path
from helixflow.safe_pickle import load_plain_dict

HELICAL_BUCKET_URL = "https://helicalpackage.s3.eu-west-2.amazonaws.com"
# Package data: the config.json of Geneformer architectures that random-weight models are built with.
ARCHITECTURES_DIR = resources.files("helixflow") / "data" / "architectures"
DICTIONARY_FILES = ("token_dictionary.pkl", "gene_median_dictionary.pkl", "ensembl_mapping_dict.pkl")
# What each dictionary maps gene ids (and special tokens, symbols) to: token ids, median
# expression, current Ensembl ids.
DICTIONARY_VALUE_KINDS = dict(zip(DICTIONARY_FILES, ("integer", "number", "string")))


@dataclass(frozen=True)
class ModelFiles:
    """Where one staged Geneformer model lives in helical's cache layout.

    Parameters
    ----------
    prefix
        The folder that plays ``CACHE_DIR_HELICAL_PREFIX``.
    model_name
        A helical model name such as ``gf-6L-10M-i2048``.
    """

    prefix: Path
    model_name: str

    # Tokenization reads these; the weights matter only from the embed step on.
    vocabulary_names = DICTIONARY_FILES

    @property
    def version(self) -> str:
        """helical's folder of the model's generation (``v1``, ``v2``, ``v3``)."""
        return model_facts(self.model_name)["version"]

    @property
    def version_dir(self) -> Path:
        return Path(self.prefix) / ".cache" / "helical" / "models" / "geneformer" / self.version

    @property
    def model_dir(self) -> Path:
        return self.version_dir / self.model_name

    @property
    def ready_file(self) -> Path:
        """A file of the model folder, which is staged last and whole: present once the model is."""
        return self.model_dir / "config.json"

    @property
    def token_dictionary(self) -> Path:
        return self.version_dir / "token_dictionary.pkl"

    @property
    def gene_median_dictionary(self) -> Path:
        return self.version_dir / "gene_median_dictionary.pkl"

    @property
    def ensembl_mapping(self) -> Path:
        return self.version_dir / "ensembl_mapping_dict.pkl"

    @property
    def relative_paths(self) -> list[str]:
        """The files helical downloads for this model, relative to ``models/``."""
        version = model_facts(self.model_name)["version"]
        weights = "pytorch_model.bin" if version == "v1" and "CZI" not in self.model_name else "model.safetensors"
        base = f"geneformer/{version}"
        return [f"{base}/{name}" for name in DICTIONARY_FILES] + [
            f"{base}/{self.model_name}/{name}" for name in ("config.json", "training_args.bin", weights)
        ]

    def check(self) -> None:
        """Raise a clear error unless every file needed to load the model is staged."""
        missing = [name for name in DICTIONARY_FILES if not (self.version_dir / name).is_file()]
        if not (self.model_dir / "config.json").is_file():
            missing.append(f"{self.model_name}/config.json")
        if not any((self.model_dir / w).is_file() for w in ("pytorch_model.bin", "model.safetensors")):
            missing.append(f"{self.model_name}/pytorch_model.bin or model.safetensors")
        if missing:
            raise HelixflowError(
                self.version_dir,
                f"model {self.model_name} is not staged (missing {', '.join(missing)}); "
                "run 'helixflow model stage' first",
            )

    def load_dictionaries(self) -> tuple[dict, dict, dict]:
        """Return the token, gene-median and Ensembl-mapping dictionaries, running no code."""
        self.check()
        return load_dictionaries(self.version_dir)

    def staged_paths(self) -> dict[str, Path]:
        """The staged files by their path under the models folder (``geneformer/v1/...``)."""
        self.check()
        base = self.version_dir.parent.parent
        paths = [self.version_dir / name for name in DICTIONARY_FILES]
        paths += sorted(path for path in self.model_dir.iterdir() if path.is_file() and not path.name.startswith("."))
        return {path.relative_to(base).as_posix(): path for path in paths}


def load_dictionaries(folder: Path) -> tuple[dict, dict, dict]:
    """Load a folder's three Geneformer dictionaries with :func:`~helixflow.safe_pickle.load_plain_dict`.

    A file that asks for anything beyond plain dicts, strings and numbers is refused with
    a :class:`HelixflowError` naming it, before any of its code could run.
    """
    return tuple(load_plain_dict(Path(folder) / name, value_kind=DICTIONARY_VALUE_KINDS[name]) for name in DICTIONARY_FILES)


def stage_synthetic(
    files: ModelFiles,
    *,
    architecture: dict | None = None,
    n_genes: int | None = None,
    seed: int = 0,
) -> None:
    """Write a randomly initialised model and synthetic dictionaries in the real layout.

    Parameters
    ----------
    files
        Where to stage.
    architecture
        A ``BertForMaskedLM`` config; ``None`` gives the tiny test model (2 layers, hidden 128).
    n_genes
        Number of synthetic genes in the vocabulary; defaults to what the architecture's
        vocabulary size leaves after the special tokens.
    seed
        Seed of the random weights.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM

    facts = model_facts(files.model_name)
    special = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if facts["special_tokens"] else [])
    if architecture is None:
        n_genes = n_genes or 2_000
        architecture = {
            "architectures": ["BertForMaskedLM"],
            "hidden_act": "relu",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": facts["input_size"],
            "attention_probs_dropout_prob": 0.02,
            "hidden_dropout_prob": 0.02,
            "layer_norm_eps": 1e-12,
            "model_type": "bert",
            "pad_token_id": 0,
            "type_vocab_size": 2,
            "vocab_size": n_genes + len(special),
        }
    n_genes = n_genes or architecture["vocab_size"] - len(special)
    if n_genes + len(special) > architecture["vocab_size"]:
        raise HelixflowError(files.model_name, f"{n_genes} genes do not fit a vocabulary of {architecture['vocab_size']}")

    ids = synthetic.gene_ids(n_genes)
    token_dictionary = {name: i for i, name in enumerate(special)}
    token_dictionary.update({gene: len(special) + i for i, gene in enumerate(ids)})
    medians = dict(zip(ids, synthetic.gene_medians(n_genes)))
    # Geneformer's ensembl_mapping_dict keys upper-case gene symbols as well as (current and
    # retired) Ensembl ids, all to current Ensembl ids; helical's tokenizer looks up
    # var.ensembl_id.str.upper() in it. Same layout here: ids to themselves, symbols to ids.
    mapping = {gene: gene for gene in ids}
    mapping.update({symbol.upper(): gene for symbol, gene in zip(synthetic.gene_symbols(n_genes), ids)})

    torch.manual_seed(seed)
    config = BertConfig(**{k: v for k, v in architecture.items() if k not in ("architectures", "model_type")})
    model = BertForMaskedLM(config)
    for name, content in zip(DICTIONARY_FILES, (token_dictionary, medians, mapping)):
        with atomic_path(files.version_dir / name) as partial, open(partial, "wb") as handle:
            pickle.dump(content, handle)
    # The model folder appears last and whole, so a staged model is complete or absent.
    with atomic_path(files.model_dir) as model_dir:
        if files.relative_paths[-1].endswith("pytorch_model.bin"):
            # v1 checkpoints are torch pickles; transformers 5 only writes safetensors itself.
            model_dir.mkdir()
            model.config.save_pretrained(model_dir)
            torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
        else:
            model.save_pretrained(model_dir)
        torch.save({"origin": "helixflow synthetic model", "seed": seed}, model_dir / "training_args.bin")


def stage_architecture(files: ModelFiles, architecture_name: str, *, seed: int = 0) -> None:
    """Stage a random model with a real Geneformer architecture (benchmarks)."""
    path = ARCHITECTURES_DIR / f"{architecture_name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.name.removesuffix(".json") for p in ARCHITECTURES_DIR.iterdir() if p.name.endswith(".json")))
        raise HelixflowError(path, f"no architecture config named {architecture_name}; known: {known}")
    stage_synthetic(files, architecture=json.loads(path.read_text()), seed=seed)


def stage_from_path(files: ModelFiles, source: Path) -> None:
    """Stage from a folder or archive (.tar, .tar.gz, .zip) laid out like ``geneformer/<version>/``.

    The source holds the three dictionaries and a ``<model_name>/`` folder; a single top-level
    folder inside an archive is looked through. The dictionaries are loaded with the
    restricted unpickler before anything is staged, so a pickle that would run code is
    refused and leaves the cache as it was; the staged files are the source's bytes.
    """
    source = Path(source)
    if not source.exists():
        raise HelixflowError(source, "no such file or folder")
    with tempfile.TemporaryDirectory() as unpacked:
        root = _unpack(source, Path(unpacked)) if source.is_file() else source
        missing = [name for name in DICTIONARY_FILES if not (root / name).is_file()]
        if not (root / files.model_name / "config.json").is_file():
            missing.append(f"{files.model_name}/config.json")
        if missing:
            raise HelixflowError(source, f"not a Geneformer model folder: missing {', '.join(missing)}")
        load_dictionaries(root)
        for name in DICTIONARY_FILES:
            with atomic_path(files.version_dir / name) as partial:
                shutil.copy2(root / name, partial)
        with atomic_path(files.model_dir) as model_dir:
            shutil.copytree(root / files.model_name, model_dir)
    files.check()


def stage_download(files: ModelFiles, *, base_url: str = HELICAL_BUCKET_URL, sha256: dict[str, str] | None = None) -> None:
    """Download the model's files, verifying each against a SHA-256 or the server's MD5 ETag.

    Parameters
    ----------
    base_url
        Where ``geneformer/<version>/...`` is served (helical's S3 bucket by default).
    sha256
        Expected SHA-256 per relative path; files not listed are checked against the MD5
        ETag that S3 sends for single-part uploads.
    """
    sha256 = sha256 or {}
    version = model_facts(files.model_name)["version"]
    with tempfile.TemporaryDirectory(dir=_existing_parent(files.version_dir)) as download_dir:
        for relative in files.relative_paths:
            target = Path(download_dir) / Path(relative).relative_to(f"geneformer/{version}")
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_checked(f"{base_url.rstrip('/')}/{relative}", target, sha256.get(relative))
        stage_from_path(files, Path(download_dir))


def _download_checked(url: str, target: Path, expected_sha256: str | None) -> None:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            etag = response.headers.get("ETag", "").strip('"')
            while block := response.read(1 << 20):
                out.write(block)
                sha.update(block)
                md5.update(block)
    except OSError as error:
        raise HelixflowError(url, f"download failed: {error}") from None
    if expected_sha256 is not None:
        if sha.hexdigest() != expected_sha256:
            raise HelixflowError(url, f"checksum mismatch: SHA-256 {sha.hexdigest()}, expected {expected_sha256}")
    elif etag and "-" not in etag and etag != md5.hexdigest():
        raise HelixflowError(url, f"checksum mismatch: MD5 {md5.hexdigest()}, server ETag {etag}")
    elif not etag or "-" in etag:
        raise HelixflowError(url, "no checksum to verify against: pass a SHA-256 manifest (--sha256)")


def _existing_parent(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unpack(archive: Path, into: Path) -> Path:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(into, filter="data")
    else:
        raise HelixflowError(archive, "not a folder, .tar(.gz) or .zip archive")
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def helical_geneformer(files: ModelFiles, *, batch_size: int = 24, device: str = "cpu", **config):
    """Construct helical's own ``Geneformer`` from staged files, with no network access.

    helical 2.2.0's constructor asks its ``Downloader`` to check every file against S3 (an
    HTTP HEAD each, failing offline). This is the one place helixflow bypasses that: it
    points the configuration at the staged files and gives it nothing to download.
    helical's ``TranscriptomeTokenizer`` reads the dictionaries with plain ``pickle.load``
    from those paths (it takes no loaded dictionaries), so helixflow first loads them with
    its restricted unpickler: a file that would run code is refused before helical opens it.
    transformers reads a ``pytorch_model.bin`` with ``torch.load(weights_only=True)``, which
    refuses code too; nothing reads ``training_args.bin``.
    """
    from helical.models.geneformer import Geneformer, GeneformerConfig

    files.load_dictionaries()
    configurer = GeneformerConfig(model_name=files.model_name, batch_size=batch_size, device=device, **config)
    configurer.files_config = {
        "model_files_dir": files.model_dir,
        "gene_median_path": files.gene_median_dictionary,
        "token_path": files.token_dictionary,
        "ensembl_dict_path": files.ensembl_mapping,
    }
    configurer.list_of_files_to_download = []
    return Geneformer(configurer)


def vocabulary_genes(token_dictionary: dict) -> np.ndarray:
    """Return the gene ids of a token dictionary (special tokens left out)."""
    return np.array([key for key in token_dictionary if not key.startswith("<")], dtype=object)
