"""Monitoring files: Prometheus config and rules with promtool, Grafana files against JSON schemas,
and the Prometheus stack of tests/prometheus_stack.py scraping a real Pushgateway and node-exporter.

Grafana itself cannot run here: dashboards are checked as files, and the end-to-end test evaluates
their PromQL against a real Prometheus (tests/render_panels.py).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import time

import pytest
import yaml
from jsonschema import Draft202012Validator
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from conftest import PROJECT_DIR, require_service
from prometheus_stack import PrometheusStack, credentials_file, local_config
from render_panels import dashboard_targets, file_name, render_panels

MONITORING = PROJECT_DIR / "monitoring"
GRAFANA = MONITORING / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
AIRFLOW_TOKEN = "/etc/prometheus/secrets/airflow-metrics-token"  # where compose.yaml mounts it
CONTRACT_JOBS = {"prometheus": "localhost:9090", "pushgateway": "pushgateway:9091",
                 "airflow": "airflow-apiserver:8080", "node": "node-exporter:9100",
                 "cadvisor": "cadvisor:8080", "dcgm": "dcgm-exporter:9400"}


def load_yaml(path):
    return yaml.safe_load(path.read_text())


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((MONITORING / "schemas" / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def promtool(*args: str) -> subprocess.CompletedProcess:
    require_service("promtool", "checks the Prometheus config and rules (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True)


def provisioned_uid() -> str:
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    return datasource["uid"]


# Prometheus


def test_prometheus_config_and_its_rules_pass_promtool(tmp_path):
    # The committed file names the token at its container path, which only --syntax-only accepts here.
    done = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # The full check (rule files, the credentials file exists) on a copy that points at a local token.
    token = tmp_path / "airflow-metrics-token"
    token.write_text("token\n")
    config = load_yaml(MONITORING / "prometheus.yml")
    config["rule_files"] = [str(MONITORING / pattern) for pattern in config["rule_files"]]
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_rules_pass_promtool_check():
    done = promtool("check", "rules", *sorted(str(p) for p in (MONITORING / "rules").glob("*.yml")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass():
    done = promtool("test", "rules", "tests/helixflow.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_scrape_jobs_are_the_contract():
    config = load_yaml(MONITORING / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {name: job["static_configs"][0]["targets"] for name, job in jobs.items()} == \
        {name: [target] for name, target in CONTRACT_JOBS.items()}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["airflow"]["metrics_path"] == "/admin/metrics/"
    # The api-server's metrics need the bearer token (airflow/plugins/helixflow_metrics_auth.py).
    assert jobs["airflow"]["authorization"] == {"type": "Bearer", "credentials_file": AIRFLOW_TOKEN}
    assert credentials_file("airflow") == AIRFLOW_TOKEN
    assert [name for name, job in jobs.items() if "authorization" in job or "basic_auth" in job] == ["airflow"]
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["rules/*.yml"]


def test_every_alert_is_labelled_annotated_and_unit_tested_both_ways():
    groups = load_yaml(MONITORING / "rules" / "helixflow.yml")["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    tests = load_yaml(MONITORING / "tests" / "helixflow.test.yml")["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    assert {"HelixflowWorkflowFailed", "HelixflowAirflowDagRunFailed", "HelixflowStepRunningLong",
            "HelixflowContainerNearMemoryLimit"} <= {alert["alert"] for alert in alerts}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical"), alert["alert"]
        assert {"summary", "description"} <= set(alert["annotations"]), alert["alert"]
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == alert["alert"]}
        assert outcomes == {True, False}, f"{alert['alert']} needs a firing and a silent test case"


# Grafana files


def test_provisioning_files_match_their_schemas():
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "helixflow.yml")
    validator("grafana-datasources.schema.json").validate(datasources)
    validator("grafana-dashboard-providers.schema.json").validate(providers)
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_matches_its_schema_and_the_datasource(path):
    dashboard = json.loads(path.read_text())
    validator("grafana-dashboard.schema.json").validate(dashboard)
    uid = provisioned_uid()
    panels = dashboard["panels"] + [child for panel in dashboard["panels"] for child in panel.get("panels", [])]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert all(target["datasource"]["uid"] == uid for target in panel["targets"]), panel["title"]
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    assert all(variable["datasource"]["uid"] == uid for variable in dashboard["templating"]["list"])
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), "titles name the rendered PNGs"


@pytest.mark.parametrize("break_it", [
    lambda d: d["panels"][1].pop("datasource"),
    lambda d: d["panels"][1]["targets"][0].pop("expr"),
    lambda d: d["panels"][1]["gridPos"].update(w=30),
    lambda d: d.pop("uid"),
], ids=["no-datasource", "no-expr", "too-wide", "no-uid"])
def test_the_dashboard_schema_rejects_broken_dashboards(break_it):
    dashboard = json.loads((GRAFANA / "dashboards" / "helixflow.json").read_text())
    broken = copy.deepcopy(dashboard)
    break_it(broken)
    assert list(validator("grafana-dashboard.schema.json").iter_errors(broken))


def test_helixflow_dashboard_covers_the_contract():
    dashboard = json.loads((GRAFANA / "dashboards" / "helixflow.json").read_text())
    rows = [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"]
    assert rows == ["Airflow", "Workflow", "Containers", "GPU"]
    assert [variable["name"] for variable in dashboard["templating"]["list"]] == ["run", "model"]
    exprs = " ".join(expr for _, _, expr in dashboard_targets(dashboard))
    for metric in ("airflow_task_status", "airflow_dag_status", "helixflow_airflow_dag_run_last_duration_seconds",
                   "helixflow_workflow_duration_seconds", "helixflow_workflow_success", "helixflow_workflow_cells",
                   "helixflow_workflow_cells_per_second", "helixflow_step_duration_seconds",
                   "helixflow_step_cells_per_second", "helixflow_step_peak_rss_bytes", "helixflow_step_cpu_seconds",
                   "container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                   "node_cpu_seconds_total", "node_memory_MemAvailable_bytes", "DCGM_FI_DEV_GPU_UTIL",
                   "DCGM_FI_DEV_FB_USED", "helixflow_step_peak_gpu_memory_bytes"):
        assert metric in exprs, metric


def test_dashboard_json_is_what_dashboards_py_generates():
    spec = importlib.util.spec_from_file_location("dashboards", GRAFANA / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = json.loads((GRAFANA / "dashboards" / "helixflow.json").read_text())
    assert committed == module.helixflow_dashboard(), "run: python monitoring/grafana/dashboards.py"
    assert module.DATASOURCE_UID == provisioned_uid()


# A real Prometheus with the project's config and rules


def test_local_config_swaps_credentials_files_and_refuses_a_missing_one(tmp_path):
    """tests/prometheus_stack.py never lets a kept job scrape without the credentials the config names."""
    targets = {"airflow": "127.0.0.1:8080", "node": "127.0.0.1:9100"}
    with pytest.raises(KeyError, match=AIRFLOW_TOKEN):
        local_config(targets, MONITORING)
    config = local_config(targets, MONITORING, {AIRFLOW_TOKEN: tmp_path / "token"})
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["airflow"]["authorization"] == {"type": "Bearer", "credentials_file": str(tmp_path / "token")}
    assert "authorization" not in jobs["node"]
    assert local_config({"node": "127.0.0.1:9100"}, MONITORING)["scrape_configs"][0]["job_name"] == "node"


def push_step(gateway: str, run: str, started: float) -> None:
    """What a running workflow step pushes first: its start time, grouped by run/step/chunk."""
    registry = CollectorRegistry()
    Gauge("helixflow_step_started_timestamp_seconds", "step start", ["model"], registry=registry) \
        .labels(model="tiny").set(started)
    push_to_gateway(gateway, job="helixflow", registry=registry,
                    grouping_key={"run": run, "step": "embed", "chunk": "0"})


def test_stack_keeps_pushed_labels_and_scrapes_node_exporter(tmp_path):
    for command in ("prometheus", "prometheus-pushgateway", "prometheus-node-exporter"):
        require_service(command, "the monitoring stack test (apt-get install prometheus prometheus-pushgateway "
                                 "prometheus-node-exporter)")
    with PrometheusStack(tmp_path) as stack:
        push_step(stack.pushgateway_url, "r1", time.time() - 5)
        (series,) = stack.wait_for('helixflow_step_started_timestamp_seconds{run="r1"}')
        # honor_labels: the pusher's job and grouping key, not the Pushgateway's scrape job.
        assert {key: series["metric"][key] for key in ("job", "run", "step", "chunk", "model")} == \
            {"job": "helixflow", "run": "r1", "step": "embed", "chunk": "0", "model": "tiny"}
        # Two scrapes at least, so that the dashboard's rate() has something.
        assert stack.wait_for('rate(node_cpu_seconds_total{job="node", mode="idle"}[1m])')
        (age,) = stack.wait_for('helixflow:step_running_age_seconds{run="r1"}')
        assert float(age["value"][1]) >= 5

        dashboard = json.loads((GRAFANA / "dashboards" / "helixflow.json").read_text())
        evaluated = render_panels(stack.url, dashboard, tmp_path / "panels", time.time() - 30, time.time(), step=1)
    counts = {title: count for title, _, count in evaluated}
    assert counts["Steps running"] == 1 and counts["Node CPU busy"] == 1
    assert len(evaluated) == len(dashboard_targets(dashboard))
    assert all((tmp_path / "panels" / file_name(title)).stat().st_size > 0 for title, count in counts.items() if count)
    assert not (tmp_path / "panels" / file_name("GPU utilisation")).exists()  # no data, no picture
