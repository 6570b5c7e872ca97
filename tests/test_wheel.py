"""A wheel (``pip install .``, not editable) carries the package data: the commands that need no
workflow checkout work from it, and ``helixflow run`` says plainly that it needs one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_DIR

# What importlib.resources finds in the installed package, and where helixflow was imported from.
FIND_DATA = """
import json
from importlib.resources import files

import helixflow
from helixflow.model_files import ARCHITECTURES_DIR
from helixflow.profiles import DEFAULT_PROFILES_DIR, PROFILE_SCHEMA

print(json.dumps({"package": helixflow.__file__, "schema": PROFILE_SCHEMA.is_file(),
                  "profiles": sorted(p.name for p in DEFAULT_PROFILES_DIR.iterdir()),
                  "architectures": sorted(p.name for p in ARCHITECTURES_DIR.iterdir()),
                  "data": str(files("helixflow") / "data")}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """helixflow built into a wheel and installed (no dependencies) into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(PROJECT_DIR / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT_DIR / name, source / name)
    # Offline: the build uses this environment's setuptools, and the install only the wheel.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", root / "dist", source], check=True)
    wheel = next((root / "dist").glob("helixflow-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", root / "site", wheel], check=True)
    return root / "site"


def run_installed(site: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed wheel first on its path (before any checkout's src/); the
    dependencies come from this environment."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=site.parent, env=env, capture_output=True, text=True)


def test_wheel_holds_the_package_data(installed):
    done = run_installed(installed, "-c", FIND_DATA)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["package"]).is_relative_to(installed)
    assert Path(found["data"]).is_relative_to(installed)
    assert found["schema"]
    assert {"tiny.yaml", "scgpt-tiny.yaml", "gf-6L-10M-i2048.yaml"} <= set(found["profiles"])
    assert "gf-6L-10M-i2048.json" in found["architectures"]


def test_profile_show_works_from_the_wheel(installed):
    done = run_installed(installed, "-m", "helixflow.cli", "profile", "show", "tiny")
    assert done.returncode == 0, done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["name"] == "tiny" and shown["model_name"] == "gf-6L-10M-i2048"
    assert set(shown["snakemake_resources"]) >= {"embed", "finetune"}


def test_run_from_the_wheel_asks_for_the_checkout(installed, tmp_path):
    done = run_installed(installed, "-m", "helixflow.cli", "run", str(tmp_path / "cells.h5ad"))
    assert done.returncode == 2
    assert "'helixflow run' needs the Snakemake workflow of a helixflow checkout" in done.stderr
    assert "Traceback" not in done.stderr
