"""The step table (helixflow.steps) is the one place a step's facts live: change it, and the rules'
resources and partitions, ``profile show`` and the Airflow DAG's stages and limits follow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from airflow_helpers import AIRFLOW_VENV, require_airflow
from conftest import PROJECT_DIR
from helixflow import cli
from helixflow.demo_data import make_demo_dataset
from helixflow.local_resources import SNAKEMAKE_RESERVE_MB
from helixflow.steps import STEPS, stage_steps, stages, until_rules

# The one edit: label_split becomes a GPU step of the fine-tuning kind.
PATCH_TABLE = ("from dataclasses import replace; from helixflow.steps import STEPS; "
               "STEPS['label_split'] = replace(STEPS['label_split'], gpu=True, kind='finetune')")
GPU_PROFILE = {"name": "gpu", "model_name": "gf-6L-10M-i2048", "device": "cuda", "threads": 2,
               "gpu": {"count": 1, "model": "a100"}, "memory_mb": {"finetune": 9000}}


def test_stages_follow_the_table_in_workflow_order():
    assert stages() == ["stage", "validate", "split", "tokenize", "embed", "label_split", "finetune", "evaluate",
                        "annotate", "report"]
    assert until_rules()["embed"] == "gather" and "report" not in until_rules()
    assert [step.name for step in stage_steps("embed")] == ["embed", "gather"]


def test_every_rule_is_in_the_table():
    rules = set()
    for path in (PROJECT_DIR / "workflow" / "rules").glob("*.smk"):
        rules |= {line.split()[1].rstrip(":") for line in path.read_text().splitlines()
                  if line.lstrip().startswith("rule ")}
    assert rules == set(STEPS)


def planned_resources(text: str) -> dict[str, str]:
    """Rule -> the resources line of its first job in a snakemake dry run."""
    planned = {}
    for block in text.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        planned.setdefault(rule, block.split("resources: ", 1)[1].split("\n", 1)[0])
    return planned


def dry_run(tmp_path, patch: str) -> dict[str, str]:
    """Plan a run of a GPU profile with the slurm-gpu profile's partitions, the table patched by ``patch``."""
    make_demo_dataset(tmp_path / "cells.h5ad", 60, seed=1)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "gpu.yaml").write_text(yaml.safe_dump(GPU_PROFILE))
    slurm_gpu = yaml.safe_load((PROJECT_DIR / "workflow" / "profiles" / "slurm-gpu" / "config.yaml").read_text())
    partitions = [f"{name}={value}" for name, value in slurm_gpu["default-resources"].items()]
    code = f"{patch}\nimport sys\nfrom snakemake.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = ["--dry-run", "--cores", "2", "--default-resources", *partitions, "--config", f"input={tmp_path}/cells.h5ad",
            f"outdir={tmp_path}/out", f"models_dir={tmp_path}/models", f"profiles_dir={tmp_path}/profiles", "model=gpu",
            "chunk_size=30"]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return planned_resources(done.stdout)


@pytest.mark.parametrize("patched", [False, True], ids=["table", "label_split-on-gpu"])
def test_rules_and_partitions_follow_the_table(tmp_path, patched):
    planned = dry_run(tmp_path, PATCH_TABLE if patched else "")
    assert "slurm_partition=gpu" in planned["embed"] and "gpu=1" in planned["embed"]
    label_split = planned["label_split"]
    if patched:
        assert "slurm_partition=gpu" in label_split and "gpu=1" in label_split and "mem_mb=9000" in label_split
    else:
        assert "slurm_partition=main" in label_split and "gpu=" not in label_split and "mem_mb=2000" in label_split


def test_profile_show_follows_the_table(tmp_path, capsys, monkeypatch):
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(GPU_PROFILE))
    monkeypatch.setitem(STEPS, "label_split", replace(STEPS["label_split"], gpu=True, kind="finetune"))
    assert cli.main(["profile", "show", "gpu", "--profiles-dir", str(tmp_path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["snakemake_resources"]["label_split"]
    assert shown["gpu"] == 1 and shown["mem_mb"] == 9000


def test_dag_stages_and_limits_follow_the_table(tmp_path):
    require_airflow()
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(GPU_PROFILE))
    code = (f"{PATCH_TABLE}\nimport json, sys\nsys.path.insert(0, 'airflow/dags')\nimport helixflow_dag as dag\n"
            "print(json.dumps({'gpu_stages': sorted(dag.GPU_STAGES), "
            "'limits': dag.stage_limits(dag.read_profile('gpu'), 'label_split')}))")
    env = {**os.environ, "HELIXFLOW_EXECUTION": "local", "HELIXFLOW_PROFILES_DIR": str(tmp_path)}
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["gpu_stages"] == ["annotate", "embed", "evaluate", "finetune", "label_split"]
    assert answer["limits"]["gpus"] == 1 and answer["limits"]["mem_mb"] == 9000 + SNAKEMAKE_RESERVE_MB
