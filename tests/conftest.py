"""Shared fixtures: a staged tiny model (v1 layout and v2 layout) and small synthetic datasets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from helixflow.demo_data import make_demo_dataset
from helixflow.model_files import ModelFiles, stage_synthetic
from compose_stack import compose_project  # noqa: F401 - the session fixture of the stack test and the Airflow tests
from prometheus_stack import PROJECT_DIR, pushgateway_service  # noqa: F401 - PROJECT_DIR: for the test modules



def require_service(command: str, reason: str) -> None:
    """Skip when a system tool is missing on a user's machine; under CI=true, fail instead."""
    if shutil.which(command) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{command} is required in CI: {reason}")
        pytest.skip(f"{command} not installed: {reason}")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def network_attempts(monkeypatch) -> list:
    """Refuse every socket connection in the test; the list collects the addresses tried."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder holding the tiny profile's model, as `helixflow model stage` leaves it."""
    root = tmp_path_factory.mktemp("models")
    stage_synthetic(ModelFiles(root / "tiny", "gf-6L-10M-i2048"))
    return root


@pytest.fixture(scope="session")
def tiny_v1(models_dir) -> ModelFiles:
    return ModelFiles(models_dir / "tiny", "gf-6L-10M-i2048")


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> ModelFiles:
    """A tiny model in the v2 layout: <cls>/<eos> tokens, input size 4096."""
    files = ModelFiles(tmp_path_factory.mktemp("models-v2"), "gf-12L-38M-i4096")
    stage_synthetic(files)
    return files


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """600 synthetic cells, 6 cell types, CSR int32 raw counts."""
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "cells.h5ad", 600, seed=1)


@pytest.fixture(scope="module", autouse=True)
def restore_environment():
    """In-process DeepSpeed sets RANK/MASTER_PORT in os.environ; later modules' subprocesses must not inherit them.

    Module scope, so the snapshot is taken before a module's own module-scoped fixtures train in-process.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory):
    """A Pushgateway on a free local port (pushes kept in memory), stopped by PID afterwards."""
    require_service("prometheus-pushgateway", "step metrics are pushed to a Pushgateway")
    service = pushgateway_service()
    service.start(tmp_path_factory.mktemp("pushgateway"))
    yield service.url
    service.stop()


def pushed_groups(url: str) -> list[dict]:
    """Every group the Pushgateway holds: its grouping labels, metric name -> value, and the model labels."""
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=5) as response:
        groups = json.load(response)["data"]
    families = [{name: family for name, family in group.items() if isinstance(family, dict) and "metrics" in family}
                for group in groups]
    return [{"labels": group["labels"],
             "values": {name: float(family["metrics"][0]["value"]) for name, family in own.items()
                        if name.startswith("helixflow_")},
             "model": {family["metrics"][0]["labels"].get("model") for name, family in own.items()
                       if name.startswith("helixflow_")}}
            for group, own in zip(groups, families)]
