"""Monitoring end to end, with real components only.

A real Prometheus (the project's config and rules), Pushgateway and node-exporter; a workflow run
on the .test data and one successful and one failed ``airflow dags test helixflow`` run (local
execution) pushing their step metrics; a real Airflow api-server serving airflow-exporter and
airflow/plugins/helixflow_metrics.py, scraped by that Prometheus. Then: the counts Prometheus holds
equal Airflow's REST API, the failed-run alert fires, and every dashboard panel's PromQL returns
data (pictures in docs/images/monitoring/). Needs .venv-airflow (`make airflow-venv`) and Debian's
prometheus, prometheus-pushgateway and prometheus-node-exporter.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from airflow_helpers import AIRFLOW_VENV, ApiServer, api_server, dags_test, init_db, local_env, require_airflow
from conftest import PROJECT_DIR, require_service
from helixflow.demo_data import make_demo_dataset
from prometheus_stack import PrometheusStack
from render_panels import dashboard_targets, file_name, render_panels

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

    def get(self, path: str):
        return self.server.get(path)


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


# ---- The whole monitoring path: steps and Airflow -> Prometheus -> every dashboard panel ----

DASHBOARD = PROJECT_DIR / "monitoring" / "grafana" / "dashboards" / "helixflow.json"
PANEL_IMAGES = PROJECT_DIR / "docs" / "images" / "monitoring"
# Sources that cannot run on the development and CI machines (docs/monitoring.md): cAdvisor
# (no installable binary, no Docker engine), the DCGM exporter and torch's GPU memory (no GPU).
UNAVAILABLE_HERE = re.compile(r"\bcontainer_\w+|\bDCGM_\w+|helixflow_step_peak_gpu_memory_bytes")


@dataclass
class Monitored:
    stack: PrometheusStack
    airflow: AirflowRuns
    started: float
    ended: float


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> Iterator[Monitored]:
    """Prometheus, Pushgateway and node-exporter; two Airflow DAG runs and a workflow run on .test data
    pushing to them; the Airflow api-server added as a scrape target."""
    require_service("prometheus", "the monitoring test evaluates the dashboards against a real Prometheus")
    require_service("prometheus-pushgateway", "the workflow steps push their metrics to a Pushgateway")
    require_service("prometheus-node-exporter", "the dashboards' node panels")
    root = tmp_path_factory.mktemp("monitoring")
    (root / "prometheus").mkdir()
    with PrometheusStack(root / "prometheus") as stack:
        started = time.time()
        run_test_workflow(root / "test-run", stack.pushgateway_url)
        with start_airflow_runs(root / "airflow", stack.pushgateway_url) as airflow:
            stack.add_target("airflow", airflow.base_url.removeprefix("http://"))
            stack.wait_for('airflow_task_status{dag_id="helixflow"}', timeout=120)
            stack.wait_for('helixflow_workflow_success{run="test"}')
            time.sleep(5)  # a few more scrapes and rule evaluations
            yield Monitored(stack, airflow, started, time.time())


def run_test_workflow(folder: Path, pushgateway: str) -> None:
    """The .test configuration (600 cells, fine-tuning included) with its own input and outputs."""
    make_demo_dataset(folder / "test.h5ad", 600, seed=3)
    config = ["--configfile", ".test/config/config.yaml", "--config", f"input={folder / 'test.h5ad'}",
              f"outdir={folder / 'results' / 'test'}", f"monitoring={{pushgateway: {pushgateway}}}"]
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *config], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_prometheus_task_counts_equal_the_rest_api(monitored):
    """Success and failure counts per task, as Prometheus has them, against Airflow's REST API."""
    instances = monitored.airflow.get("/api/v2/dags/helixflow/dagRuns/~/taskInstances?limit=1000")["task_instances"]
    expected = Counter((ti["task_id"], ti["state"] or "none") for ti in instances)
    scraped = {(series["metric"]["task_id"], series["metric"]["status"]): float(series["value"][1])
               for series in monitored.stack.query('airflow_task_status{dag_id="helixflow"}')}
    assert scraped == expected
    for state in ("success", "failed"):
        served = monitored.stack.query(f'sum(airflow_task_status{{dag_id="helixflow", status="{state}"}})')
        assert float(served[0]["value"][1]) == sum(n for (_, s), n in expected.items() if s == state) > 0


def test_step_metrics_of_the_workflow_run_reach_prometheus(monitored):
    per_chunk = monitored.stack.query('helixflow_step_cells{run="test", step="tokenize"}')
    assert sorted(series["metric"]["chunk"] for series in per_chunk) == ["chunk-00000", "chunk-00001", "chunk-00002"]
    assert {float(series["value"][1]) for series in per_chunk} == {200.0}
    assert all(series["metric"]["model"] == "tiny" and series["metric"]["job"] == "helixflow" for series in per_chunk)
    steps = {series["metric"]["step"] for series in monitored.stack.query('helixflow_step_success{run="test"} == 1')}
    assert {"validate_input", "split", "tokenize", "embed", "gather", "plot_embeddings", "label_split", "finetune",
            "evaluate", "pipeline_info"} <= steps
    assert float(monitored.stack.query('helixflow_workflow_cells{run="test"}')[0]["value"][1]) == 600


def test_prometheus_dag_run_durations_equal_the_rest_api(monitored):
    runs = monitored.airflow.get("/api/v2/dags/helixflow/dagRuns?limit=100")["dag_runs"]
    assert Counter(run["state"] for run in runs) == {"success": 1, "failed": 1}
    for run in runs:
        took = (datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])).total_seconds()
        selector = f'{{dag_id="helixflow", state="{run["state"]}"}}'
        assert float(monitored.stack.query(f"helixflow_airflow_dag_run_duration_seconds_count{selector}")[0]["value"][1]) == 1
        for name in ("helixflow_airflow_dag_run_duration_seconds_sum", "helixflow_airflow_dag_run_last_duration_seconds"):
            assert float(monitored.stack.query(name + selector)[0]["value"][1]) == pytest.approx(took, abs=1)


def test_failed_dag_run_alert_fires(monitored):
    firing = monitored.stack.wait_for('ALERTS{alertname="HelixflowAirflowDagRunFailed", alertstate="firing"}')
    assert firing[0]["metric"]["dag_id"] == "helixflow"


def test_every_dashboard_panel_returns_data_and_is_pictured(monitored):
    """Each panel's PromQL over the test's time window; its picture goes to docs/images/monitoring/."""
    dashboard = json.loads(DASHBOARD.read_text())
    rendered = render_panels(monitored.stack.url, dashboard, PANEL_IMAGES, monitored.started, monitored.ended, step=2)
    assert len(rendered) == len(dashboard_targets(dashboard))
    empty = [(title, expr) for title, expr, series in rendered if series == 0 and not UNAVAILABLE_HERE.search(expr)]
    assert not empty, empty
    unavailable = {title for title, expr, _ in rendered if UNAVAILABLE_HERE.search(expr)}
    assert unavailable == {"Stage container CPU", "Stage container memory", "Stage container memory / limit",
                           "GPU utilisation", "GPU framebuffer used", "Step peak GPU memory"}
    guide = (PROJECT_DIR / "docs" / "monitoring.md").read_text()
    for title, _, _ in rendered:
        if title not in unavailable:
            assert f"images/monitoring/{file_name(title)}" in guide, title
