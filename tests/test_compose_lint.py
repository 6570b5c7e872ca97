"""Offline checks of the container files: compose.yaml against the compose-spec, Dockerfiles with hadolint."""

from __future__ import annotations

import os
import re
import shutil
import stat
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


def test_compose_keeps_the_docker_socket_in_the_guard():
    compose = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "docker-guard", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer"} <= set(services)
    for name, service in services.items():
        mounts = " ".join(str(volume) for volume in service.get("volumes", []))
        if name in ("docker-guard", "cadvisor"):  # cAdvisor reads container labels from the engine
            assert "docker.sock:ro" in mounts
        else:
            assert "docker.sock" not in mounts, name
        if name.startswith("airflow-"):
            assert service["environment"]["HELIXFLOW_DOCKER_URL"] == "tcp://docker-guard:2375"
            # Only the scheduler (LocalExecutor: it runs the tasks) reaches the guard.
            assert ("docker-api" in service["networks"]) == (name == "airflow-scheduler"), name
        if name not in ("airflow-init", "helixflow-image"):  # one-shot services
            assert "healthcheck" in service, name
    assert compose["networks"]["docker-api"]["internal"] is True
    assert compose["networks"]["metrics"]["internal"] is True  # the stages' network: no egress
    ignored = (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and (PROJECT_DIR / ".env.example").is_file()


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted(str(p.relative_to(PROJECT_DIR)) for folder in ("containers", "ci/stand-ins")
                         for p in (PROJECT_DIR / folder).glob("*.Dockerfile"))
    assert {"containers/helixflow-gpu.Dockerfile", "containers/mlflow.Dockerfile", "ci/stand-ins/postgres.Dockerfile"} <= set(dockerfiles)
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


def test_every_published_port_is_on_loopback_by_default():
    """No service listens beyond the host unless its .env setting says so (AIRFLOW_BIND for the UI)."""
    services = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())["services"]
    published = {name: port for name, service in services.items() for port in service.get("ports", [])}
    assert "airflow-apiserver" in published and "mlflow" in published
    for name, port in published.items():
        assert port.startswith(("127.0.0.1:", "${AIRFLOW_BIND:-127.0.0.1}:")), (name, port)


def test_no_secret_has_a_default():
    """Every password, key and secret comes from the .env (ci/make-env.sh), or compose refuses to start."""
    text = (PROJECT_DIR / "compose.yaml").read_text()
    # Compose's own interpolations ($${...} is the container shell's variable).
    secrets = re.findall(r"(?<!\$)\$\{([A-Z_]*(?:PASSWORD|SECRET|FERNET_KEY)[A-Z_]*)(:?[-?=+]?)([^}]*)\}", text)
    assert len({name for name, _, _ in secrets}) >= 6, secrets
    for name, operator, _ in secrets:
        assert operator == ":?", f"{name} has a default or may be empty in compose.yaml"


def test_metrics_token_reaches_only_the_api_server_and_prometheus():
    """The bearer token of /admin/metrics/ (docs/airflow.md, Security): a compose secret from the file
    ci/make-env.sh writes, in the api-server (HELIXFLOW_METRICS_TOKEN_FILE) and in Prometheus at the
    path monitoring/prometheus.yml reads it from."""
    compose = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())
    services = compose["services"]
    assert compose["secrets"] == {"airflow-metrics-token": {"file": "./secrets/airflow-metrics-token"}}
    api = services["airflow-apiserver"]
    assert api["secrets"] == ["airflow-metrics-token"]
    assert api["environment"]["HELIXFLOW_METRICS_TOKEN_FILE"] == "/run/secrets/airflow-metrics-token"
    # Otherwise the api-server has the environment of the scheduler, less the S3 credentials (tasks only).
    assert {k: v for k, v in api["environment"].items() if k != "HELIXFLOW_METRICS_TOKEN_FILE"} == \
        {k: v for k, v in services["airflow-scheduler"]["environment"].items() if k not in S3_CREDENTIALS}
    scrape_jobs = yaml.safe_load((PROJECT_DIR / "monitoring" / "prometheus.yml").read_text())["scrape_configs"]
    (airflow_job,) = [job for job in scrape_jobs if job["job_name"] == "airflow"]
    assert services["prometheus"]["secrets"] == [
        {"source": "airflow-metrics-token", "target": airflow_job["authorization"]["credentials_file"]}]
    assert {name for name, service in services.items() if "secrets" in service} == {"airflow-apiserver", "prometheus"}
    assert [name for name, service in services.items()
            if "HELIXFLOW_METRICS_TOKEN_FILE" in service.get("environment", {})] == ["airflow-apiserver"]
    # Never committed, never sent to an image build.
    assert "/secrets/" in (PROJECT_DIR / ".gitignore").read_text().splitlines()
    assert "secrets" in (PROJECT_DIR / ".dockerignore").read_text().splitlines()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "${S3_ROOT_USER:?run ci/make-env.sh}",
                  "AWS_SECRET_ACCESS_KEY": "${S3_ROOT_PASSWORD:?run ci/make-env.sh}"}


def test_s3_service_is_pinned_healthy_on_loopback_and_its_credentials_reach_only_the_task_runners():
    """MinIO by a release tag (CI: moto's stand-in, S3_IMAGE), its port on 127.0.0.1, a healthcheck, the
    root credentials from the .env; boto3 gets them only where S3 is used (bucket creation, tasks)."""
    services = yaml.safe_load((PROJECT_DIR / "compose.yaml").read_text())["services"]
    s3 = services["s3"]
    assert re.fullmatch(r"\$\{S3_IMAGE:-minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ\}", s3["image"]), s3["image"]
    assert s3["ports"] == ["127.0.0.1:${S3_PORT:-9000}:9000"]
    assert s3["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert s3["environment"] == {"MINIO_ROOT_USER": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 "MINIO_ROOT_PASSWORD": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    assert "metrics" in s3["networks"]  # the stage containers stage s3:// inputs from it
    assert s3["volumes"] == ["s3-data:/data"]
    with_credentials = {name for name, service in services.items()
                        if S3_CREDENTIALS.items() <= service.get("environment", {}).items()}
    assert with_credentials == {"airflow-init", "airflow-scheduler"}
    for name in ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert services[name]["depends_on"]["s3"] == {"condition": "service_healthy"}, name
        assert services[name]["environment"]["AWS_ENDPOINT_URL_S3"] == "http://s3:9000", name
    assert "create_bucket" in services["airflow-init"]["command"][1]
    assert "S3_IMAGE=" in (PROJECT_DIR / "ci" / "stand-ins" / "build.sh").read_text()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_env_writes_a_metrics_token_both_containers_can_read_and_rotates_it_in_place(tmp_path):
    """The folder 0700 (no other host user gets in), the file 0644 (compose binds it with this mode into
    the api-server, AIRFLOW_UID:0, and Prometheus, nobody); --metrics-token rewrites the same inode,
    which a running container's bind mount keeps showing."""
    clone = tmp_path / "clone"
    (clone / "ci").mkdir(parents=True)
    shutil.copy2(PROJECT_DIR / "ci" / "make-env.sh", clone / "ci")
    script = clone / "ci" / "make-env.sh"
    env = {key: value for key, value in os.environ.items() if key != "DOCKER_HOST"}
    subprocess.run([script, tmp_path / "data", tmp_path / "results"], env=env, check=True, capture_output=True)
    folder, token = clone / "secrets", clone / "secrets" / "airflow-metrics-token"
    assert (mode(folder), mode(token), mode(clone / ".env")) == (0o700, 0o644, 0o600)
    first, inode = token.read_text(), token.stat().st_ino
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", first)
    assert first.strip() not in (clone / ".env").read_text()
    written = dict(line.split("=", 1) for line in (clone / ".env").read_text().splitlines() if "=" in line and line[0] != "#")
    assert re.fullmatch(r"helixflow-[0-9a-f]{12}", written["S3_ROOT_USER"])
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", written["S3_ROOT_PASSWORD"])

    subprocess.run([script, "--metrics-token"], env=env, check=True, capture_output=True)
    assert token.read_text() != first and re.fullmatch(r"[A-Za-z0-9_-]{43}\n", token.read_text())
    assert (token.stat().st_ino, mode(token)) == (inode, 0o644)

    again = subprocess.run([script], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "--metrics-token" in again.stderr
