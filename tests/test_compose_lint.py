"""Offline checks of the container files: compose.yaml against the compose-spec, Dockerfiles with hadolint."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_DIR

TOOLS = Path(os.environ.get("HELIXFLOW_AIRFLOW_VENV", PROJECT_DIR / ".venv-airflow")) / "bin"


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is required in CI (make airflow-venv)")
        pytest.skip(f"{name} not installed (make airflow-venv)")
    return path


def test_compose_validates_against_the_compose_spec():
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
                          cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_keeps_the_docker_socket_in_the_proxy():
    compose = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "docker-proxy", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= set(services)
    for name, service in services.items():
        mounts = " ".join(str(volume) for volume in service.get("volumes", []))
        if name in ("docker-proxy", "cadvisor"):  # cAdvisor reads container labels from the engine
            assert "docker.sock:ro" in mounts
        else:
            assert "docker.sock" not in mounts, name
        if name.startswith("airflow-"):
            assert service["environment"]["HELIXFLOW_DOCKER_URL"] == "tcp://docker-proxy:2375"
        if name not in ("airflow-init",):
            assert "healthcheck" in service, name
    assert compose["networks"]["docker-api"]["internal"] is True
    ignored = (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and (PROJECT_DIR / ".env.example").is_file()


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted(str(p.relative_to(PROJECT_DIR)) for p in (PROJECT_DIR / "containers").glob("*.Dockerfile"))
    assert "containers/helixflow-gpu.Dockerfile" in dockerfiles
    done = subprocess.run([tool("hadolint"), *dockerfiles], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_monitoring_profile():
    """Prometheus, Pushgateway, exporters and Grafana in the monitoring profile; Airflow serves its own metrics."""
    text = (PROJECT_DIR / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    for name in ("prometheus", "pushgateway", "node-exporter", "cadvisor", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    assert services["dcgm-exporter"]["profiles"] == ["gpu"]
    assert "--web.enable-lifecycle" in services["prometheus"]["command"]
    assert {"./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
            "./monitoring/rules:/etc/prometheus/rules:ro"} <= set(services["prometheus"]["volumes"])
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert services["grafana"]["ports"] == ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"]
    assert "GRAFANA_ADMIN_PASSWORD=" in (PROJECT_DIR / ".env.example").read_text()
    for name in ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        service = services[name]
        assert service["environment"]["HELIXFLOW_PUSHGATEWAY"] == "http://pushgateway:9091", name
        assert "./airflow/plugins:/opt/airflow/plugins:ro" in service["volumes"], name
        assert "metrics" in service["networks"], name
    assert "statsd" not in text.lower()
