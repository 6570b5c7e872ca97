"""Model resource profiles: shipped ones load, resolve into Snakemake resources, bad ones are refused clearly."""

from __future__ import annotations

import pytest
import yaml

from helixflow import cli
from helixflow.errors import HelixflowError
from helixflow.families import FAMILIES
from helixflow.geneformer_models import GENEFORMER_MODELS
from helixflow.profiles import DEFAULT_PROFILES_DIR, list_profiles, load_profile, step_resources
from helixflow.steps import STEPS

GPU_PROFILE = {"name": "big", "model_name": "gf-12L-104M-i4096", "device": "cuda", "precision": "bf16", "threads": 16,
               "gpu": {"count": 2, "model": "a100", "memory_mb": 80000},
               "memory_mb": {"light": 3000, "embed": 32000, "finetune": 64000},
               "runtime_min_per_10k_cells": {"light": 4, "embed": 30, "finetune": 150}}


def write_profile(folder, content: dict | str, name: str | None = None):
    name = name or content["name"]
    path = folder / f"{name}.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize("name", list_profiles())
def test_each_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile["name"] == name and profile["model_name"] in FAMILIES[profile["family"]].models
    assert {"threads", "memory_mb", "embed", "train", "runtime_min_per_10k_cells", "gpu"} <= set(profile)


def test_every_helical_model_size_has_a_profile():
    models = {load_profile(name)["model_name"] for name in list_profiles()}
    sizes = {name.split("-i")[0] for name in GENEFORMER_MODELS}  # e.g. gf-12L-40M, with its variants
    assert sizes <= {name.split("-i")[0] for name in models}


def test_defaults_fill_what_a_profile_leaves_out(tmp_path):
    write_profile(tmp_path, {"name": "bare", "model_name": "gf-6L-10M-i2048"})
    profile = load_profile("bare", tmp_path)
    assert profile["device"] == "auto" and profile["precision"] == "fp32" and profile["gpu"]["count"] == 0
    assert profile["train"] == {"batch_size": 8, "precision": None, "gradient_accumulation": 1, "zero_stage": 2,
                                "offload_optimizer": "none", "offload_params": "none", "frozen_layers": 0,
                                "learning_rate": 5.0e-5, "epochs": 1, "checkpoint_every": 50,
                                "best_metric": "validation_loss", "patience": 3, "min_delta": 0.0}


def test_model_steps_get_the_profile_and_light_steps_little(tmp_path):
    write_profile(tmp_path, GPU_PROFILE)
    profile = load_profile("big", tmp_path)
    embed = step_resources(profile, "embed", n_cells=20_000)
    assert embed == {"threads": 16, "mem_mb": 32000, "runtime": 60, "gpu": 2, "gpu_model": "a100"}
    assert step_resources(profile, "finetune", n_cells=5_000) == {"threads": 16, "mem_mb": 64001, "runtime": 75,
                                                                 "gpu": 2, "gpu_model": "a100"}
    assert step_resources(profile, "evaluate")["gpu"] == 2 and step_resources(profile, "annotate")["mem_mb"] == 32000
    for light in ("split", "tokenize", "gather", "label_split"):
        assert step_resources(profile, light, n_cells=10_000) == {"threads": 2, "mem_mb": 3000, "runtime": 4}


def test_memory_grows_with_the_dataset_only_for_the_steps_that_need_it(tmp_path):
    write_profile(tmp_path, {**GPU_PROFILE, "memory_mb_per_million_cells": {"finetune": 200}})
    profile = load_profile("big", tmp_path)
    assert profile["memory_mb_per_million_cells"] == {"finetune": 200, "validate_input": 10}  # defaults filled in
    assert step_resources(profile, "finetune", n_cells=10_000_000)["mem_mb"] == 64000 + 2000
    assert step_resources(profile, "validate_input", n_cells=10_000_000)["mem_mb"] == profile["memory_mb"]["light"] + 100
    for bounded in ("gather", "label_split", "evaluate", "annotate", "split", "embed"):
        assert step_resources(profile, bounded, n_cells=10_000_000)["mem_mb"] == profile["memory_mb"][STEPS[bounded].kind]


def test_cpu_profile_asks_for_no_gpu_and_at_least_a_minute():
    profile = load_profile("tiny")
    resources = step_resources(profile, "embed", n_cells=10)
    assert resources == {"threads": 2, "mem_mb": profile["memory_mb"]["embed"], "runtime": 1}


@pytest.mark.parametrize(("change", "where"), [
    ({"theads": 4}, "(top level): Additional properties are not allowed ('theads' was unexpected)"),
    ({"threads": "four"}, "threads: 'four' is not of type 'integer'"),
    ({"train": {"zero_stage": 4}}, "train/zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ({"train": {"bach_size": 4}}, "train: Additional properties are not allowed ('bach_size' was unexpected)"),
    ({"memory_mb": {"embed": 50}}, "memory_mb/embed: 50 is less than the minimum of 100"),
])
def test_a_bad_profile_names_its_file_and_key(tmp_path, change, where):
    path = write_profile(tmp_path, {"name": "bad", "model_name": "gf-6L-10M-i2048", **change})
    with pytest.raises(HelixflowError) as raised:
        load_profile("bad", tmp_path)
    assert raised.value.path == str(path)
    assert raised.value.problem == f"invalid profile at {where}"


@pytest.mark.parametrize(("train", "device", "message"), [
    ({"zero_stage": 2, "offload_params": "cpu"}, "cuda", "offload_params: cpu needs zero_stage: 3"),
    ({"zero_stage": 0, "offload_optimizer": "cpu"}, "cuda", "offload_optimizer needs zero_stage 1, 2 or 3"),
    ({"precision": "fp16"}, "cpu", "fp16 training needs a GPU"),
])
def test_train_settings_deepspeed_cannot_run_are_refused(tmp_path, train, device, message):
    path = write_profile(tmp_path, {"name": "bad", "model_name": "gf-6L-10M-i2048", "device": device, "train": train})
    with pytest.raises(HelixflowError, match=message) as raised:
        load_profile("bad", tmp_path)
    assert raised.value.path == f"{path}: train"


def test_other_profile_problems_are_clear(tmp_path):
    write_profile(tmp_path, "name: [unclosed", name="broken")
    with pytest.raises(HelixflowError, match="not valid YAML"):
        load_profile("broken", tmp_path)
    write_profile(tmp_path, {"name": "other", "model_name": "gf-6L-10M-i2048"}, name="renamed")
    with pytest.raises(HelixflowError, match="profile name 'other' differs from its file name 'renamed'"):
        load_profile("renamed", tmp_path)
    write_profile(tmp_path, {"name": "unknown", "model_name": "gf-99L"})
    with pytest.raises(HelixflowError, match="not a model helixflow knows"):
        load_profile("unknown", tmp_path)
    with pytest.raises(HelixflowError, match=r"unknown model profile 'missing'; profiles in .*: broken, renamed, unknown"):
        load_profile("missing", tmp_path)


def test_a_user_profile_in_another_folder_works_without_code(tmp_path, capsys):
    write_profile(tmp_path, {**GPU_PROFILE, "name": "mine", "description": "my cluster's A100s"})
    assert "mine" not in list_profiles()
    assert cli.main(["profile", "list", "--profiles-dir", str(tmp_path)]) == 0
    assert "mine" in capsys.readouterr().out
    assert cli.main(["profile", "show", "mine", "--profiles-dir", str(tmp_path), "--cells", "20000"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["snakemake_resources"]["embed"] == {"threads": 16, "mem_mb": 32000, "runtime": 60, "gpu": 2, "gpu_model": "a100"}


def test_profile_show_prints_what_tiny_resolves_to(capsys):
    assert cli.main(["profile", "show", "tiny"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "tiny" and shown["model_name"] == "gf-6L-10M-i2048"
    assert shown["train"]["zero_stage"] == 2 and shown["train"]["offload_optimizer"] == "cpu"
    resources = shown["snakemake_resources"]
    assert list(resources) == list(STEPS)
    # Whole-dataset steps for a million cells, per-chunk steps for a chunk of 10,000.
    assert resources["finetune"] == {"threads": 2, "mem_mb": 4030, "runtime": 2000}
    assert resources["evaluate"] == {"threads": 2, "mem_mb": 2000, "runtime": 500}
    assert resources["gather"] == {"threads": 2, "mem_mb": 1500, "runtime": 200}
    assert resources["split"] == {"threads": 2, "mem_mb": 1500, "runtime": 2}
    assert all("gpu" not in step for step in resources.values())


def test_profile_show_reports_an_unknown_profile(capsys):
    assert cli.main(["profile", "show", "nope"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"helixflow: error: {DEFAULT_PROFILES_DIR / 'nope.yaml'}: unknown model profile 'nope'")
