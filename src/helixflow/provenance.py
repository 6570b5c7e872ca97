"""What produced a run's results: software versions and the staged model files' checksums.

Two uses:

- a record: each embed job writes :func:`provenance` of its own process (the versions that
  actually computed the embeddings, in a container or conda env too) into its chunk's
  ``uns``; gather carries it into ``embeddings.h5ad`` (``uns["helixflow"]["provenance"]``) and
  the ``software_versions`` step into ``pipeline_info/software_versions.yml``;
- a rerun trigger: the workflow gives each rule a ``params`` value, :func:`step_fingerprint`,
  naming the versions and model checksums its results depend on. Snakemake stores params with
  each output and reruns a job whose params changed (its default ``params`` rerun trigger), so a
  new helixflow release or different model files redo the affected steps instead of silently
  reusing old chunks.

Hashing a large model takes seconds: checksums are cached by file size and modification time
in the environment variable ``HELIXFLOW_MODEL_CHECKSUMS``, which snakemake's jobs (also SLURM
jobs, which parse the workflow again) inherit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from helixflow.errors import HelixflowError

CHECKSUM_CACHE_ENV = "HELIXFLOW_MODEL_CHECKSUMS"
# Packages recorded in every provenance record (helical: the reference implementation and the
# model loader of `helixflow info`; the workflow steps do not import it).
RECORDED_PACKAGES = ("helixflow", "helical", "torch", "transformers", "anndata", "deepspeed", "snakemake")
# What each rule's results depend on besides its input files: the packages whose code computes
# them, and which model files ("dictionaries": the files tokenization reads, the vocabulary; "all": also the
# weights). Rules not listed depend on helixflow only.
STEP_DEPENDENCIES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "validate_input": (("helixflow",), "dictionaries"),
    "split": (("helixflow", "anndata"), None),
    "tokenize": (("helixflow",), "dictionaries"),
    "embed": (("helixflow", "torch", "transformers"), "all"),
    "gather": (("helixflow", "anndata"), None),
    "finetune": (("helixflow", "torch", "transformers", "deepspeed"), "all"),
    "evaluate": (("helixflow", "torch", "transformers"), None),
    "annotate": (("helixflow", "torch", "transformers"), None),
    "workflow": (("helixflow", "snakemake"), None),  # the software_versions record of the run
}


@functools.cache
def package_version(name: str) -> str:
    """The installed version of a distribution, or ``not installed``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def software_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """Versions of ``packages`` in this process's environment, and Python's."""
    # Distribution metadata, not imports: torch's reads e.g. 2.13.0+cpu (the build, not only the release).
    return {**{name: package_version(name) for name in packages}, "python": platform.python_version()}


def model_checksums(files) -> dict[str, str]:
    """SHA-256 of every staged model file, by its name under the models folder (cached, see the module)."""
    cache = json.loads(os.environ.get(CHECKSUM_CACHE_ENV) or "{}")
    checksums = {}
    for name, path in files.staged_paths().items():
        stat = path.stat()
        key = str(path.resolve())
        cached = cache.get(key)
        if cached and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
            checksums[name] = cached[2]
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        checksums[name] = digest.hexdigest()
        cache[key] = [stat.st_size, stat.st_mtime_ns, checksums[name]]
    os.environ[CHECKSUM_CACHE_ENV] = json.dumps(cache)
    return checksums


def model_record(files, profile_name: str) -> dict:
    """The model part of a provenance record: profile, helical model name and version, checksums."""
    # In an .h5ad's uns, the '/' of each path makes nested groups: flat_checksums reads them back.
    return {"profile": profile_name, "name": files.model_name, "version": files.version,
            "files_sha256": model_checksums(files)}


def flat_checksums(tree: dict, prefix: str = "") -> dict[str, str]:
    """``files_sha256`` of a record read back from an .h5ad (where ``/`` in a key makes a group), flat again."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_checksums(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = str(value)
    return flat


def provenance(files, profile_name: str) -> dict:
    """The provenance record of this process: software versions and the model."""
    return {"software": software_versions(), "model": model_record(files, profile_name)}


def step_fingerprint(step: str, files) -> str:
    """The versions and model checksums that ``step``'s results depend on, as one line.

    A model that is not staged yet (the workflow's ``stage_model`` job will stage it) has no
    checksums: call this when the job runs, not when the workflow is parsed.
    """
    packages, model_part = STEP_DEPENDENCIES.get(step, (("helixflow",), None))
    parts = [f"{name}={value}" for name, value in software_versions(packages).items() if name != "python"]
    if model_part is not None:
        try:
            checksums = model_checksums(files)
        except HelixflowError:
            checksums = {}  # not staged: the job that needs the model waits for stage_model
        if model_part == "dictionaries":
            checksums = {name: value for name, value in checksums.items() if Path(name).name in files.vocabulary_names}
        digest = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
        parts.append(f"model={files.model_name} model_files_sha256={digest if checksums else 'not staged'}")
    return " ".join(parts)


def common_provenance(records: list[dict | None], where: str | Path) -> dict:
    """The one provenance record shared by all ``records`` (the chunks of one run).

    Raises
    ------
    HelixflowError
        When chunks were computed with different software or model files, or some without a record.
    """
    if any(record is None for record in records):
        raise HelixflowError(where, "some chunks hold no provenance record (embedded by an older helixflow); "
                             "remove them and rerun the workflow")
    distinct = {json.dumps(record, sort_keys=True) for record in records}
    if len(distinct) > 1:
        raise HelixflowError(where, f"chunks were embedded with {len(distinct)} different software versions or model files; "
                             "rerun the workflow (snakemake's params trigger redoes the outdated chunks)")
    return records[0]


def write_software_versions(out: str | Path, embeddings: str | Path, workflow_versions: str) -> dict:
    """Write ``pipeline_info/software_versions.yml`` (nf-core style) and return what it holds.

    Parameters
    ----------
    out
        The YAML file to write.
    embeddings
        The gathered embeddings, whose ``uns`` holds the embed jobs' provenance record.
    workflow_versions
        The workflow process's :func:`step_fingerprint` (``name=version`` pairs).
    """
    import h5py
    import yaml
    from anndata.io import read_elem

    from helixflow.outputs import atomic_path

    with h5py.File(embeddings, "r") as handle:
        if "uns/helixflow/provenance" not in handle:
            raise HelixflowError(embeddings, "holds no provenance record (uns['helixflow']['provenance']); rerun gather")
        record = read_elem(handle["uns/helixflow/provenance"])
    versions = {
        "workflow": dict(pair.split("=", 1) for pair in workflow_versions.split()),
        "embed": {name: str(value) for name, value in record["software"].items()},
        "model": {"profile": str(record["model"]["profile"]), "name": str(record["model"]["name"]),
                  "version": str(record["model"]["version"]),
                  "files_sha256": dict(sorted(flat_checksums(record["model"]["files_sha256"]).items()))},
    }
    with atomic_path(out) as partial:
        partial.write_text(yaml.safe_dump(versions, sort_keys=False))
    return versions
