"""Helpers shared by the Airflow tests: the Airflow environment, `airflow dags test`, a real api-server."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PROJECT_DIR
from prometheus_stack import free_port, stop_process_group

AIRFLOW_VENV = Path(os.environ.get("HELIXFLOW_AIRFLOW_VENV", PROJECT_DIR / ".venv-airflow"))
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
CONF_DATE = "2025-01-02T00:00:00+00:00"
DAGS_FOLDER = PROJECT_DIR / "airflow" / "dags"
PLUGINS_FOLDER = PROJECT_DIR / "airflow" / "plugins"


def require_airflow() -> None:
    """Skip without the Airflow environment on a user's machine; under CI=true, fail instead."""
    if not AIRFLOW.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{AIRFLOW} is required in CI (make airflow-venv)")
        pytest.skip(f"no Airflow environment at {AIRFLOW_VENV} (make airflow-venv)")


def airflow_env(home: Path, base: dict | None = None, **settings: str) -> dict:
    """An environment with an Airflow home (sqlite) and the repository's DAGs and plugins.

    Parameters
    ----------
    home : Path
        AIRFLOW_HOME; the metadata database and the logs go there.
    base : dict, optional
        The environment to extend; default: the test process's.
    **settings : str
        More variables, overriding the defaults.
    """
    return {**(os.environ if base is None else base), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "NO_COLOR": "1", **settings}


def local_env(home: Path, data: Path, results: Path, helixflow: str, **settings: str) -> dict:
    """HELIXFLOW_EXECUTION=local: the DAG's stages as local processes of ``helixflow`` (no Docker API)."""
    return airflow_env(home, HELIXFLOW_EXECUTION="local", HELIXFLOW_BIN=helixflow, HELIXFLOW_DATA_DIR=str(data),
                       HELIXFLOW_RESULTS_DIR=str(results), HELIXFLOW_RETRIES="0", **settings)


def airflow_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run ``airflow ARGS`` and assert that it succeeded."""
    done = subprocess.run([AIRFLOW, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def init_db(env: dict) -> None:
    """A fresh metadata database and the GPU pool the DAG's embed stage uses."""
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "pools", "set", "helixflow_gpu", "1", "GPU stages")


def dags_test(env: dict, conf: dict, logical_date: str | None = CONF_DATE,
              timeout: int = 900) -> subprocess.CompletedProcess:
    """One ``airflow dags test helixflow`` run with the given conf (the return code is not checked).

    ``dags test`` records the logical date as the run's start date: ``logical_date=None`` leaves it
    out, so the run starts now and its recorded duration is the real one.
    """
    date = [logical_date] if logical_date else []
    return subprocess.run([AIRFLOW, "dags", "test", "helixflow", *date, "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class ApiServer:
    """A running api-server: its base URL and an admin token for the REST API."""

    base_url: str
    token: str

    def get(self, path: str):
        """GET ``path`` (e.g. ``/api/v2/dags``) with the token; the decoded JSON answer."""
        request = urllib.request.Request(f"{self.base_url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


def wait_for_health(base_url: str, server: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5):
                return
        except OSError:
            assert server.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "api-server did not answer"
            time.sleep(1)


@contextlib.contextmanager
def api_server(env: dict, log_path: Path) -> Iterator[ApiServer]:
    """A real ``airflow api-server`` on a free port (every user an admin), stopped by process group after.

    Parameters
    ----------
    env : dict
        The Airflow environment (see ``airflow_env``); the database must be migrated.
    log_path : Path
        Where the server's output goes.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True", "AIRFLOW__API__BASE_URL": base_url}
    with open(log_path, "w") as log:
        server = subprocess.Popen([AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_health(base_url, server, log_path)
            with urllib.request.urlopen(f"{base_url}/auth/token", timeout=30) as response:
                token = json.load(response)["access_token"]
            yield ApiServer(base_url, token)
        finally:
            stop_process_group(server)
