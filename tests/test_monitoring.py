"""Monitoring end to end, with real components only.

A real Prometheus (the project's config and rules), Pushgateway and node-exporter; a workflow run
on the .test data and one successful and one failed ``airflow dags test helixflow`` run (local
execution) pushing their step metrics; a real Airflow api-server serving airflow-exporter and
airflow/plugins/helixflow_metrics.py behind the bearer token of helixflow_metrics_auth.py, scraped
by that Prometheus with the token file. Then: the metrics answer only with the token, the counts
Prometheus holds equal Airflow's REST API, the failed-run alert fires, and every dashboard panel's
PromQL returns data (pictures in docs/images/monitoring/). Needs .venv-airflow (`make airflow-venv`)
and Debian's prometheus, prometheus-pushgateway and prometheus-node-exporter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from airflow_helpers import (AIRFLOW, AIRFLOW_VENV, ApiServer, api_server, dags_test, init_db, local_env,
                             require_airflow, wait_for_health)
from conftest import PROJECT_DIR, require_service
from helixflow.demo_data import make_demo_dataset
from prometheus_stack import PrometheusStack, api_get, credentials_file, free_port, stop_process_group
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
def start_airflow_runs(tmp_dir: Path, pushgateway_url: str | None = None,
                       metrics_token_file: Path | None = None) -> Iterator[AirflowRuns]:
    """Run the helixflow DAG twice (success, failure) in local mode, then serve the database.

    Parameters
    ----------
    tmp_dir : Path
        An empty folder for the Airflow home, data and results.
    pushgateway_url : str, optional
        HELIXFLOW_PUSHGATEWAY for the runs (the stages push their step metrics there); unset: none.
    metrics_token_file : Path, optional
        HELIXFLOW_METRICS_TOKEN_FILE of the api-server (the bearer token of ``/admin/metrics/``);
        unset: the api-server refuses its metrics.

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
    env.pop("HELIXFLOW_METRICS_TOKEN_FILE", None)
    if metrics_token_file:
        env["HELIXFLOW_METRICS_TOKEN_FILE"] = str(metrics_token_file)
    log = tmp_dir / "api-server.log"
    with api_server(env, log) as server:
        yield AirflowRuns(server, {"home": home, "data": data, "results": results, "log": log}, env)


@pytest.mark.parametrize("url", ["http://pushgateway:9091", None])
def test_local_stages_get_the_pushgateway_address_when_set(url):
    """HELIXFLOW_PUSHGATEWAY of the Airflow services reaches the stage processes; unset, nothing is added."""
    require_airflow()
    # A local stage sets its environment as it starts (execute), from local_stage_environment.
    code = ("import json, sys; sys.path.insert(0, 'airflow/dags'); import helixflow_dag as dag; "
            "task = dag.helixflow_dag.get_task('embed'); "
            "print(json.dumps([dag.local_stage_environment({'input': 'test.h5ad'}), task.append_env]))")
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
    token_file: Path


def write_token_file(folder: Path) -> Path:
    """A fresh metrics token laid out as ci/make-env.sh does: the folder 0700, the file 0644."""
    folder.mkdir(mode=0o700)
    token_file = folder / "airflow-metrics-token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o644)
    return token_file


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> Iterator[Monitored]:
    """Prometheus, Pushgateway and node-exporter; two Airflow DAG runs and a workflow run on .test data
    pushing to them; the Airflow api-server (metrics behind a bearer token) added as a scrape target,
    Prometheus given the same token file as compose gives it."""
    require_service("prometheus", "the monitoring test evaluates the dashboards against a real Prometheus")
    require_service("prometheus-pushgateway", "the workflow steps push their metrics to a Pushgateway")
    require_service("prometheus-node-exporter", "the dashboards' node panels")
    root = tmp_path_factory.mktemp("monitoring")
    (root / "prometheus").mkdir()
    token_file = write_token_file(root / "secrets")
    with PrometheusStack(root / "prometheus", secrets={credentials_file("airflow"): token_file}) as stack:
        started = time.time()
        run_test_workflow(root / "test-run", stack.pushgateway_url)
        with start_airflow_runs(root / "airflow", stack.pushgateway_url, token_file) as airflow:
            stack.add_target("airflow", airflow.base_url.removeprefix("http://"))
            stack.wait_for('airflow_task_status{dag_id="helixflow"}', timeout=120)
            stack.wait_for('helixflow_workflow_success{run="test"}')
            time.sleep(5)  # a few more scrapes and rule evaluations
            yield Monitored(stack, airflow, started, time.time(), token_file)


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


# ---- /admin/metrics/ behind the bearer token (airflow/plugins/helixflow_metrics_auth.py) ----

def fetch(url: str, token: str | None = None, headers: dict | None = None) -> tuple[int, dict, str]:
    """GET `url` (with ``Authorization: Bearer <token>`` when given): status, headers and body, errors included."""
    headers = dict(headers or {}) | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def airflow_target(stack: PrometheusStack) -> dict:
    """Prometheus's view of its scrape target of job airflow (health, lastScrape, lastError, scrapeUrl)."""
    (target,) = [t for t in api_get(stack.url, "/api/v1/targets")["activeTargets"] if t["labels"]["job"] == "airflow"]
    return target


def wait_for_scrape(stack: PrometheusStack, after: float, health: str, timeout: float = 30) -> dict:
    """Wait until Prometheus has scraped job airflow after `after` (Unix time) with `health`; its target."""
    deadline = time.monotonic() + timeout
    while True:
        target = airflow_target(stack)
        if datetime.fromisoformat(target["lastScrape"]).timestamp() > after and target["health"] == health:
            return target
        assert time.monotonic() < deadline, target
        time.sleep(0.25)


@contextlib.contextmanager
def bare_api_server(env: dict, log_path: Path, base_path: str) -> Iterator[str]:
    """A real api-server whose ``[api] base_url`` ends in `base_path`, without Airflow's all-admins mode.

    ``airflow_helpers.api_server`` runs in that mode, where Airflow's own middleware adds an
    ``Authorization`` header (an admin JWT) to every request; here a request reaches the metrics
    guard with only the headers it was sent with. Yields the base URL.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}{base_path}"
    env = {**env, "AIRFLOW__API__BASE_URL": base_url}
    env.pop("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", None)
    with open(log_path, "w") as log:
        server = subprocess.Popen([AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_health(base_url, server, log_path)
            yield base_url
        finally:
            stop_process_group(server)


def test_metrics_answer_only_with_the_bearer_token(monitored):
    base, token = monitored.airflow.base_url, monitored.token_file.read_text().strip()
    # The last path is /admin/metrics/ percent-encoded: the server decodes it before routing.
    for path in ("/admin/metrics/", "/admin/metrics", "/admin/%6Detrics/"):
        # This server runs in all-admins mode: Airflow adds its admin JWT to every request, so "no
        # token" reaches the guard as a wrong one (bare_api_server's test sends none at all).
        for wrong in (None, "not-the-token", token[:-1], monitored.airflow.server.token):
            status, headers, body = fetch(base + path, wrong)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer "), (path, wrong)
            assert "airflow_task_status" not in body
        status, _, body = fetch(base + path, token)
        assert status == 200, path
        assert "airflow_task_status{" in body and "helixflow_airflow_dag_run_duration_seconds_count{" in body
    assert fetch(base + "/admin/metrics/", headers={"Authorization": f"Basic {token}"})[0] == 401
    assert fetch(base + "/admin/metrics/", headers={"Authorization": f"bearer {token}"})[0] == 200
    # The rest of the api-server is as before: health without credentials, the REST API with Airflow's token.
    assert fetch(base + "/api/v2/monitor/health")[0] == 200
    assert monitored.airflow.get("/api/v2/dags/helixflow")["dag_id"] == "helixflow"


def test_prometheus_scrapes_the_metrics_with_the_token_file(monitored):
    target = airflow_target(monitored.stack)
    assert target["health"] == "up" and target["lastError"] == "", target
    assert target["scrapeUrl"] == f"{monitored.airflow.base_url}/admin/metrics/"
    assert [float(s["value"][1]) for s in monitored.stack.query('up{job="airflow"}')] == [1.0]
    jobs = yaml.safe_load(monitored.stack.config.read_text())["scrape_configs"]
    (job,) = [job for job in jobs if job["job_name"] == "airflow"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": str(monitored.token_file)}


def test_metrics_under_a_base_url_path_need_the_token_too(monitored, tmp_path):
    """With ``[api] base_url`` ending in /airflow the metrics are served under /airflow/admin/metrics/;
    the top-level router also matches the exporter's mount for /admin/metrics/: both are guarded."""
    token = monitored.token_file.read_text().strip()
    env = {**monitored.airflow.env, "HELIXFLOW_METRICS_TOKEN_FILE": str(monitored.token_file)}
    with bare_api_server(env, tmp_path / "api-server.log", "/airflow") as base_url:
        origin = base_url.removesuffix("/airflow")
        served = (f"{base_url}/admin/metrics/", f"{base_url}/admin/metrics")
        for url in (*served, f"{origin}/admin/metrics/"):
            status, headers, _ = fetch(url)
            assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="helixflow metrics"'), url
            status, headers, _ = fetch(url, "not-the-token")
            assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"], url
        for url in served:
            status, _, body = fetch(url, token)
            assert status == 200 and "airflow_task_status{" in body, url


def test_metrics_are_refused_without_the_token_file_setting(monitored, tmp_path):
    """HELIXFLOW_METRICS_TOKEN_FILE unset: 403 to everyone (no token could help), and the log says why."""
    env = dict(monitored.airflow.env)
    env.pop("HELIXFLOW_METRICS_TOKEN_FILE", None)
    log = tmp_path / "api-server.log"
    with bare_api_server(env, log, "") as base_url:
        for token in (None, monitored.token_file.read_text().strip()):
            status, headers, body = fetch(base_url + "/admin/metrics/", token)
            assert status == 403 and "WWW-Authenticate" not in headers and "airflow_task_status" not in body
        assert fetch(base_url + "/api/v2/monitor/health")[0] == 200
    assert "HELIXFLOW_METRICS_TOKEN_FILE is not set: /admin/metrics answers 403 to every request" in log.read_text()


def wait_for_log(path: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.2)


def test_rotated_token_needs_no_restart_and_an_unreadable_file_is_refused(monitored):
    """Last in this module: it changes the token file that the api-server and Prometheus share."""
    url, log = f"{monitored.airflow.base_url}/admin/metrics/", monitored.airflow.paths["log"]
    old, new = monitored.token_file.read_text().strip(), secrets.token_urlsafe(32)
    inode = monitored.token_file.stat().st_ino
    rotated = time.time()
    monitored.token_file.write_text(new + "\n")  # in place, as ci/make-env.sh --metrics-token does
    assert monitored.token_file.stat().st_ino == inode
    assert fetch(url, old)[0] == 401 and fetch(url, new)[0] == 200
    # Prometheus re-reads its credentials file at every scrape: still up, with the new token.
    wait_for_scrape(monitored.stack, rotated, "up")

    away = monitored.token_file.with_name("moved-away")
    os.rename(monitored.token_file, away)
    try:
        status, _, body = fetch(url, new)
        assert status == 403 and "no usable metrics token" in body
        wait_for_log(log, f"cannot read the metrics token file {monitored.token_file} (HELIXFLOW_METRICS_TOKEN_FILE)")
    finally:
        os.rename(away, monitored.token_file)
    assert fetch(url, new)[0] == 200
    wait_for_log(log, f"metrics token file {monitored.token_file} is readable again")
    wait_for_scrape(monitored.stack, time.time(), "up")
