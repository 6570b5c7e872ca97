"""Monitoring end to end: what the Airflow api-server's /admin/metrics/ serves after real DAG runs.

One successful and one failed ``airflow dags test helixflow`` run (local execution, no Docker API),
then a real api-server with airflow-exporter and airflow/plugins/helixflow_metrics.py: the metrics
must agree with the REST API. Needs the Airflow environment (.venv-airflow, `make airflow-venv`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from airflow_helpers import AIRFLOW_VENV, ApiServer, api_server, dags_test, init_db, local_env, require_airflow
from conftest import PROJECT_DIR

pytestmark = pytest.mark.slow

GOOD_CONF = {"input": "cells.h5ad", "model": "tiny", "stages": ["stage", "validate", "split", "tokenize", "embed"]}
BAD_CONF = {"input": "bad.h5ad", "model": "tiny", "stages": ["stage", "validate"]}


@dataclass
class AirflowRuns:
    """The api-server after one successful and one failed helixflow run, and where their files are.

    Attributes
    ----------
    server : ApiServer
        ``server.get(path)`` for the REST API.
    paths : dict
        ``home`` (AIRFLOW_HOME), ``data``, ``results`` and ``log`` (the api-server's output).
    env : dict
        The environment the runs and the server had.
    """

    server: ApiServer
    paths: dict
    env: dict

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def metrics_url(self) -> str:
        return f"{self.server.base_url}/admin/metrics/"

    def get(self, path: str):
        return self.server.get(path)

    def metrics(self) -> str:
        """The text Prometheus scrapes (no token: the endpoint is open, like any exporter)."""
        with urllib.request.urlopen(self.metrics_url, timeout=60) as response:
            return response.read().decode()


def run_dag(env: dict, conf: dict) -> subprocess.CompletedProcess:
    started = time.monotonic()
    run = dags_test(env, conf, logical_date=None)  # starts now: real durations
    print(f"dags test {conf['input']}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return run


@contextlib.contextmanager
def start_airflow_runs(tmp_dir: Path, pushgateway_url: str | None = None) -> Iterator[AirflowRuns]:
    """Run the helixflow DAG twice (success, failure) in local mode, then serve the database.

    Parameters
    ----------
    tmp_dir : Path
        An empty folder for the Airflow home, data and results.
    pushgateway_url : str, optional
        HELIXFLOW_PUSHGATEWAY for the runs (the stages push their step metrics there); unset: none.

    Yields
    ------
    AirflowRuns
        The running api-server (stopped on exit) and the paths.
    """
    require_airflow()
    helixflow = shutil.which("helixflow")
    home, data, results = tmp_dir / "home", tmp_dir / "data", tmp_dir / "results"
    subprocess.run([helixflow, "demo-data", data / "cells.h5ad", "--cells", "300", "--seed", "4"], check=True,
                   capture_output=True)
    (data / "bad.h5ad").write_text("not an h5ad file\n")
    env = local_env(home, data, results, helixflow)
    env.pop("HELIXFLOW_PUSHGATEWAY", None)
    if pushgateway_url:
        env["HELIXFLOW_PUSHGATEWAY"] = pushgateway_url
    init_db(env)
    good = run_dag(env, GOOD_CONF)
    assert good.returncode == 0, (good.stdout + good.stderr)[-6000:]
    run_dag(env, BAD_CONF)  # fails; its state is checked over the REST API
    log = tmp_dir / "api-server.log"
    with api_server(env, log) as server:
        yield AirflowRuns(server, {"home": home, "data": data, "results": results, "log": log}, env)


@pytest.fixture(scope="module")
def airflow_runs(tmp_path_factory) -> Iterator[AirflowRuns]:
    with start_airflow_runs(tmp_path_factory.mktemp("airflow-runs")) as runs:
        yield runs


def samples(text: str, name: str) -> list:
    """Every sample called ``name`` in a Prometheus text exposition."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name]


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_airflow_metrics_endpoint_counts_equal_the_rest_api(airflow_runs):
    text = airflow_runs.metrics()
    instances = airflow_runs.get("/api/v2/dags/helixflow/dagRuns/~/taskInstances?limit=1000")["task_instances"]
    expected = Counter((ti["task_id"], ti["state"] or "none") for ti in instances)
    served = {(s.labels["task_id"], s.labels["status"]): s.value for s in samples(text, "airflow_task_status")
              if s.labels["dag_id"] == "helixflow"}
    assert served == expected
    assert expected[("plan", "success")] == 2
    assert sum(n for (_, state), n in expected.items() if state == "failed") >= 1

    runs = airflow_runs.get("/api/v2/dags/helixflow/dagRuns?limit=100")["dag_runs"]
    assert Counter(run["state"] for run in runs) == {"success": 1, "failed": 1}
    counts = {s.labels["state"]: s.value for s in samples(text, "helixflow_airflow_dag_run_duration_seconds_count")
              if s.labels["dag_id"] == "helixflow"}
    sums = {s.labels["state"]: s.value for s in samples(text, "helixflow_airflow_dag_run_duration_seconds_sum")
            if s.labels["dag_id"] == "helixflow"}
    last = {s.labels["state"]: s.value for s in samples(text, "helixflow_airflow_dag_run_last_duration_seconds")
            if s.labels["dag_id"] == "helixflow"}
    assert counts == {"success": 1, "failed": 1}
    for run in runs:
        duration = seconds(run["start_date"], run["end_date"])
        assert sums[run["state"]] == pytest.approx(duration, abs=1)
        assert last[run["state"]] == pytest.approx(duration, abs=1)


@pytest.mark.parametrize("url", ["http://pushgateway:9091", None])
def test_local_stages_get_the_pushgateway_address_when_set(url):
    """HELIXFLOW_PUSHGATEWAY of the Airflow services reaches the stage processes; unset, nothing is added."""
    require_airflow()
    code = ("import json, sys; sys.path.insert(0, 'airflow/dags'); import helixflow as dag; "
            "task = dag.helixflow_dag.get_task('embed'); print(json.dumps([task.env, task.append_env]))")
    env = local_env(Path("/nonexistent"), Path("/data"), Path("/results"), "helixflow")
    env.pop("HELIXFLOW_PUSHGATEWAY", None)
    if url:
        env["HELIXFLOW_PUSHGATEWAY"] = url
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stage_env, append = json.loads(done.stdout.strip().splitlines()[-1])
    assert stage_env == ({"HELIXFLOW_PUSHGATEWAY": url} if url else {}) and append is True
