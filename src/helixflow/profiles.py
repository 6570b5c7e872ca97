"""Model resource profiles: one YAML file per model, validated, with defaults filled in.

A profile says what a model needs (device, precision, GPUs, memory, batch sizes, DeepSpeed)
and the workflow turns it into each rule's Snakemake ``threads`` and ``resources``, which
local runs, containers and the SLURM executor all read.
"""

from __future__ import annotations

import math
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

from helixflow.errors import HelixflowError
from helixflow.families import model_family
from helixflow.steps import STEPS

# Kept light (no model stack): the Airflow DAG loads profiles with this module.
# Package data (src/helixflow/data), found through the import system: an installed wheel (the
# Airflow image) finds it as a checkout does. The profiles folder is a Path (helixflow is always
# installed as files), as a user's --profiles-dir is: both are named in messages and passed on.
PROFILE_SCHEMA = files("helixflow") / "data" / "profile.schema.yaml"
DEFAULT_PROFILES_DIR = Path(files("helixflow") / "data" / "profiles")


def _validator_with_defaults(schema: dict) -> jsonschema.protocols.Validator:
    """A Draft 2020-12 validator that also writes each property's ``default`` into the instance."""
    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = yaml.safe_load(yaml.safe_dump(subschema["default"]))
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def load_profile(name: str, profiles_dir: str | Path | None = None) -> dict:
    """Read, validate and complete the profile ``name`` from ``profiles_dir``.

    Raises
    ------
    HelixflowError
        When the profile does not exist (the message lists those that do), is not valid
        YAML, breaks the schema, or names a model no family of :mod:`helixflow.families` knows.
    """
    profiles_dir = Path(profiles_dir or DEFAULT_PROFILES_DIR)
    path = profiles_dir / f"{name}.yaml"
    # A name is a file name in profiles_dir, never a path out of it (the DAG's form passes user input).
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith(".") or not path.is_file():
        known = ", ".join(sorted(p.stem for p in profiles_dir.glob("*.yaml"))) or "none"
        raise HelixflowError(path, f"unknown model profile '{name}'; profiles in {profiles_dir}: {known}")
    try:
        profile = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise HelixflowError(path, f"not valid YAML ({error})") from None
    if not isinstance(profile, dict):
        raise HelixflowError(path, "a profile must be a mapping of settings")
    schema = yaml.safe_load(PROFILE_SCHEMA.read_text())
    error = jsonschema.exceptions.best_match(_validator_with_defaults(schema).iter_errors(profile))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise HelixflowError(path, f"invalid profile at {where}: {error.message}")
    if profile["name"] != name:
        raise HelixflowError(path, f"profile name '{profile['name']}' differs from its file name '{name}'")
    profile["family"] = model_family(profile["model_name"]).name  # derived, never written in a profile
    train = profile["train"]
    check_train_settings(train, precision=train["precision"] or profile["precision"], device=profile["device"],
                         where=f"{path}: train")
    return profile


def check_train_settings(train: dict, *, precision: str, device: str, where: str | Path = "train") -> None:
    """Raise a clear error for fine-tuning settings that DeepSpeed cannot run together.

    Parameters
    ----------
    train
        A profile's ``train`` section.
    precision
        The training precision.
    device
        ``cpu``, ``cuda`` or ``auto`` (not known yet: fp16 is then checked at run time).
    where
        Named in the error (the profile file).
    """
    if train["offload_params"] != "none" and train["zero_stage"] != 3:
        raise HelixflowError(where, f"offload_params: {train['offload_params']} needs zero_stage: 3 (it is {train['zero_stage']})")
    if train["offload_optimizer"] != "none" and train["zero_stage"] == 0:
        raise HelixflowError(where, "offload_optimizer needs zero_stage 1, 2 or 3 (it is 0)")
    if precision == "fp16" and device == "cpu":
        raise HelixflowError(where, "fp16 training needs a GPU; use bf16 or fp32 on CPU")


def list_profiles(profiles_dir: str | Path | None = None) -> list[str]:
    """Names of the profiles in ``profiles_dir``."""
    return sorted(p.stem for p in Path(profiles_dir or DEFAULT_PROFILES_DIR).glob("*.yaml"))


def uses_gpu(profile: dict, step: str) -> bool:
    """Whether ``step`` runs on the GPU with ``profile``: a GPU step of a profile with GPUs."""
    return STEPS[step].gpu and profile["gpu"]["count"] > 0


def step_resources(profile: dict, step: str, n_cells: int = 10_000) -> dict:
    """Snakemake ``threads`` and ``resources`` of one step for ``n_cells`` (a chunk's, or for a
    step sized by the dataset, the dataset's; see ``helixflow.steps``).

    Memory is the profile's ``memory_mb`` of the step's kind, plus, for the steps listed in
    ``memory_mb_per_million_cells``, that much per million of ``n_cells``.

    Returns
    -------
    dict
        ``threads``, ``mem_mb``, ``runtime`` (minutes), and for GPU steps ``gpu`` and
        ``gpu_model`` (the resource names the SLURM executor turns into ``--gpus``).
    """
    kind = STEPS[step].kind
    per_million = profile["memory_mb_per_million_cells"].get(step, 0)
    resources = {
        "threads": profile["threads"] if kind != "light" else min(profile["threads"], 2),
        "mem_mb": profile["memory_mb"][kind] + math.ceil(per_million * n_cells / 1_000_000),
        "runtime": max(1, math.ceil(profile["runtime_min_per_10k_cells"][kind] * n_cells / 10_000)),
    }
    if uses_gpu(profile, step):
        resources["gpu"] = profile["gpu"]["count"]
        if profile["gpu"]["model"]:
            resources["gpu_model"] = profile["gpu"]["model"]
    return resources
