"""The command line: help, info (through helical's own loader), profiles, model staging."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata
import yaml

from helixflow.cli import main
from helixflow.demo_data import make_demo_dataset
from helixflow.profiles import DEFAULT_PROFILES_DIR, load_profile, step_resources


def test_every_command_has_help():
    for command in (["run"], ["info"], ["model", "stage"], ["profile", "show"], ["demo-data"], ["step", "tokenize"]):
        result = subprocess.run([sys.executable, "-m", "helixflow.cli", *command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: helixflow" in result.stdout


def test_info_loads_the_staged_model_with_helical(models_dir, capsys):
    assert main(["info", "--profile", "tiny", "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert "loaded by helical.models.geneformer.Geneformer" in out
    assert "2 layers, hidden 128" in out and "helical" in out and "2.2.0" in out


def test_info_says_when_the_model_is_not_staged(tmp_path, capsys):
    assert main(["info", "--profile", "tiny", "--models-dir", str(tmp_path)]) == 0
    assert "not staged" in capsys.readouterr().out


def test_profile_show_prints_resources(capsys):
    assert main(["profile", "show", "gf-12L-104M-i4096", "--cells", "10000"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = step_resources(load_profile("gf-12L-104M-i4096"), "embed", 10_000)
    assert shown["snakemake_resources"]["embed"] == expected
    assert expected["gpu"] == 1 and expected["gpu_model"] == "a100"


def test_model_stage_tiny(tmp_path, capsys):
    assert main(["model", "stage", "--profile", "tiny", "--models-dir", str(tmp_path), "--tiny"]) == 0
    assert (tmp_path / "tiny" / ".cache" / "helical" / "models" / "geneformer" / "v1" / "gf-6L-10M-i2048" / "config.json").is_file()


def test_demo_data_without_labels_is_the_same_cells_without_cell_types(tmp_path):
    for name, extra in (("labelled", []), ("unlabelled", ["--no-labels"])):
        assert main(["demo-data", str(tmp_path / f"{name}.h5ad"), "--cells", "50", "--seed", "2", *extra]) == 0
    labelled, unlabelled = (anndata.read_h5ad(tmp_path / f"{name}.h5ad") for name in ("labelled", "unlabelled"))
    assert "cell_type" in labelled.obs and list(unlabelled.obs.columns) == ["donor"]
    assert (labelled.X != unlabelled.X).nnz == 0 and labelled.obs_names.equals(unlabelled.obs_names)


def test_bad_profile_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("name: mine\nmodel_name: gf-6L-10M-i2048\nembed: {batch_size: -1}\n")
    assert main(["profile", "show", "mine", "--profiles-dir", str(tmp_path)]) == 2
    assert "mine.yaml: invalid profile at embed/batch_size" in capsys.readouterr().err


def test_run_hands_jobs_to_a_slurm_profile(dataset, tmp_path):
    result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--out", str(tmp_path / "o"),
                             "--models-dir", str(tmp_path / "m"), "--workflow-profile", "slurm", "--dry-run"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Using workflow specific profile" in result.stdout + result.stderr
    assert "profiles/slurm for setting" in result.stdout + result.stderr
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_until_stage_with_a_staged_model_does_nothing(dataset, models_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--out", str(tmp_path / "o"),
                             "--models-dir", str(models_dir), "--until", "stage"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "already staged" in result.stderr
    assert not (tmp_path / "o").exists()


def test_no_finetune_leaves_out_the_training_steps(dataset, models_dir, tmp_path):
    def planned(*extra):
        result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--out", str(tmp_path / "o"),
                                 "--models-dir", str(models_dir), "--dry-run", *extra], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout + result.stderr

    assert "rule finetune:" in planned()
    without = planned("--no-finetune")
    assert "rule finetune:" not in without and "rule label_split:" not in without and "rule embed:" in without
    assert not list(tmp_path.glob("helixflow-config-*"))


def test_run_says_when_the_linear_probe_beats_fine_tuning(models_dir, tmp_path):
    """A profile that all but skips training (learning rate 1e-9): the frozen model's probe wins, and the run's
    last lines, metrics.json and the report say so plainly."""
    dataset = make_demo_dataset(tmp_path / "cells.h5ad", 240, mean_counts=500, seed=4)
    profile = yaml.safe_load((DEFAULT_PROFILES_DIR / "tiny.yaml").read_text())
    profile["train"].update(learning_rate=1e-9, epochs=1)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    out = tmp_path / "o"
    result = subprocess.run([sys.executable, "-m", "helixflow.cli", "run", str(dataset), "--out", str(out), "--models-dir",
                             str(models_dir), "--profiles-dir", str(tmp_path / "profiles"), "--cores", "2"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((out / "evaluate" / "metrics.json").read_text())["probe_comparison"]
    assert comparison["probe_wins"] and comparison["message"].startswith("fine-tuning: held-out accuracy")
    assert f"helixflow: {comparison['message']} (see {out / 'report.html'})" in result.stdout.splitlines()[-3:]
    assert comparison["message"] in (out / "report.html").read_text()
    assert comparison["message"] in (out / "logs" / "evaluate.log").read_text()
