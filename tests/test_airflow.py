"""The Airflow DAG for real: podman's Docker API, the CPU image, `airflow dags test`, the api-server.

Needs podman (+ runc, debootstrap) and the Airflow environment (.venv-airflow, `make airflow-venv`);
skipped on a user's machine without them, failing under CI=true. Slow: the first image build takes
minutes (cached layers after that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from airflow_helpers import (AIRFLOW, AIRFLOW_VENV, airflow_cli, airflow_env, api_server, dags_test,
                             init_db, local_env, require_airflow)
from conftest import PROJECT_DIR, require_service, sha256

IMAGE = "localhost/helixflow:0.1.0"
LOCAL_STAGES = ["stage", "validate", "split", "tokenize", "embed"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def podman():
    """A podman service with a Docker API on a socket in a fresh state dir; stopped by PID after."""
    require_service("podman", "the Airflow tests run containers through podman's Docker API")
    require_airflow()
    state = Path(tempfile.mkdtemp(prefix="hfp-", dir="/tmp"))  # a socket path must stay short
    up = subprocess.run([PROJECT_DIR / "ci" / "podman-up.sh", state], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    env = dict(os.environ)
    for word in up.stdout.split():
        if "=" in word:
            key, value = word.split("=", 1)
            env[key] = value
    try:
        yield env
    finally:
        subprocess.run([PROJECT_DIR / "ci" / "podman-down.sh", state], env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def image(podman) -> str:
    """The CPU image, built with podman on the locally bootstrapped base (cached layers are reused)."""
    base = subprocess.run([PROJECT_DIR / "ci" / "base-image.sh"], env=podman, capture_output=True, text=True)
    assert base.returncode == 0, base.stderr
    started = time.monotonic()
    build = subprocess.run([PROJECT_DIR / "ci" / "build-image.sh", "containers/helixflow.Dockerfile", IMAGE,
                            "--build-arg", "BAKE_MODEL_PROFILE=tiny"], env=podman, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    print(f"image build: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return IMAGE


def podman_cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True)


def test_image_default_command_and_data_check(podman, image):
    info = podman_cli(podman, "run", "--rm", image)
    assert info.returncode == 0, info.stderr
    for line in ("helical", "torch", "device", "precision", "staged; loaded by helical"):
        assert line in info.stdout
    user = podman_cli(podman, "run", "--rm", "--entrypoint", "id", image, "-u")
    assert user.stdout.strip() == "1000"
    missing = podman_cli(podman, "run", "--rm", image, "run", "/data/x.h5ad")
    assert missing.returncode == 2
    assert "helixflow: error: /data: data folder missing" in missing.stderr



def test_airflow_image_builds_without_the_model_stack(podman):
    """The Airflow image (Airflow 3.3.2 + providers-docker) on the same local base, no torch in it."""
    tag = "localhost/helixflow-airflow:3.3.2"
    started = time.monotonic()
    build = subprocess.run([PROJECT_DIR / "ci" / "build-image.sh", "containers/airflow.Dockerfile", tag],
                           env=podman, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    print(f"airflow image build: {time.monotonic() - started:.0f} s", file=sys.stderr)
    version = podman_cli(podman, "run", "--rm", tag, "version")
    assert version.stdout.strip().splitlines()[-1] == "3.3.2", version.stdout + version.stderr
    check = podman_cli(podman, "run", "--rm", "--entrypoint", "python", tag, "-c",
                       "import importlib.util as u, airflow.providers.docker as d, os; "
                       "print(os.getuid(), u.find_spec('torch') is None, u.find_spec('helical') is None)")
    assert check.stdout.split() == ["50000", "True", "True"], check.stdout + check.stderr


@pytest.fixture(scope="module")
def stack(podman, image, tmp_path_factory):
    """Data (read-only for the containers), results, and an Airflow home with sqlite."""
    root = tmp_path_factory.mktemp("airflow-stack")
    data, results, home = root / "data", root / "results", root / "airflow-home"
    data.mkdir()
    results.mkdir()
    helixflow = shutil.which("helixflow")
    subprocess.run([helixflow, "demo-data", data / "test.h5ad", "--cells", "600", "--seed", "3"], check=True,
                   capture_output=True)
    # Containers never need the network: the model is staged on the host beforehand.
    subprocess.run([helixflow, "model", "stage", "--profile", "tiny", "--tiny", "--models-dir", data / "models"],
                   check=True, capture_output=True)
    (data / "bad.h5ad").write_text("not an h5ad file\n")
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    results.chmod(0o777)  # the image's user (uid 1000) writes here
    env = airflow_env(home, podman, AIRFLOW__CORE__EXECUTOR="LocalExecutor",
                      AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
                      HELIXFLOW_DOCKER_URL=podman["DOCKER_HOST"], HELIXFLOW_DATA_DIR=str(data),
                      HELIXFLOW_RESULTS_DIR=str(results), HELIXFLOW_IMAGE=image, HELIXFLOW_RETRIES="0",
                      HELIXFLOW_TEST_LABEL="1")
    init_db(env)
    return {"env": env, "data": data, "results": results, "home": home}


def task_logs(stack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (stack["home"] / "logs").rglob("*.log"))


def test_dag_runs_the_workflow_in_containers(stack):
    before = sha256(stack["data"] / "test.h5ad")
    started = time.monotonic()
    run = dags_test(stack["env"], {"input": "test.h5ad", "model": "tiny", "run_name": "ok"})
    print(f"dags test (6 stages): {time.monotonic() - started:.0f} s", file=sys.stderr)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    out = stack["results"] / "ok"
    for relative in ("embeddings/embeddings.h5ad", "report.html", "qc/input_check.json",
                     "report/embedding_summary.json", "pipeline_info/execution_trace.tsv"):
        assert (out / relative).is_file(), relative
    assert "'cells': 600, 'genes': 1640" in output  # the summary's XCom, as the task logs its return value
    assert sha256(stack["data"] / "test.h5ad") == before
    assert sorted(p.name for p in stack["data"].iterdir()) == ["bad.h5ad", "models", "test.h5ad"]
    assert podman_cli(stack["env"], "ps", "-aq", "--filter", "label=helixflow.test=1").stdout.strip() == ""
    # The data folder is mounted read-only: a container cannot write into it.
    write = podman_cli(stack["env"], "run", "--rm", "-v", f"{stack['data']}:/data:ro", "--entrypoint", "touch",
                       IMAGE, "/data/x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr

    # A second run with the same names (DAG, tasks, run name, results folder) does not conflict:
    # every container is gone, and the new ones are named after the new run id.
    assert "helixflow container: helixflow-helixflow-" in output
    again = dags_test(stack["env"], {"input": "test.h5ad", "model": "tiny", "run_name": "ok"})
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert podman_cli(stack["env"], "ps", "-aq", "--filter", "label=helixflow.test=1").stdout.strip() == ""


def test_failing_stage_fails_its_task_with_the_error(stack):
    run = dags_test(stack["env"], {"input": "bad.h5ad", "model": "tiny", "run_name": "bad"})
    output = run.stdout + run.stderr + task_logs(stack)
    assert run.returncode != 0 or "failed" in output.lower()
    assert "helixflow: error: /data/bad.h5ad" in output
    assert "DockerContainerFailedException" in output or "Docker container failed" in output
    assert podman_cli(stack["env"], "ps", "-aq", "--filter", "label=helixflow.test=1").stdout.strip() == ""


def test_killing_a_running_task_leaves_no_container(stack):
    process = subprocess.Popen([AIRFLOW, "dags", "test", "helixflow", "2025-01-03T00:00:00+00:00", "-c",
                                json.dumps({"input": "test.h5ad", "model": "tiny", "run_name": "killed"})],
                               env=stack["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            running = podman_cli(stack["env"], "ps", "-q", "--filter", "label=helixflow.test=1")
            if running.stdout.strip():
                break
            assert process.poll() is None, process.stdout.read()[-4000:]
            time.sleep(0.3)
        else:
            pytest.fail("no stage container started")
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    time.sleep(1)
    left = podman_cli(stack["env"], "ps", "-a", "--filter", "label=helixflow.test=1", "--format", "{{.Names}} {{.Status}}")
    assert left.stdout.strip() == "", left.stdout + output[-4000:]


def test_api_server_lists_the_dag_and_its_params(tmp_path):
    """A real api-server: the DAG and its params over the REST API, and a screenshot of its graph."""
    require_airflow()
    env = airflow_env(tmp_path / "airflow-home")
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "dags", "reserialize")
    errors = airflow_cli(env, "dags", "list-import-errors", "-o", "json")
    assert errors.stdout.strip().splitlines()[-1] == "[]", errors.stdout + errors.stderr
    with api_server(env, tmp_path / "api-server.log") as server:
        dags = {dag["dag_id"] for dag in server.get("/api/v2/dags")["dags"]}
        assert {"helixflow", "helixflow_inbox"} <= dags
        details = server.get("/api/v2/dags/helixflow/details")
        assert set(details["params"]) == {"input", "model", "stages", "run_name", "chunk_size", "workflow_profile"}
        assert "tiny" in details["params"]["model"]["schema"]["enum"]
        tasks = [t["task_id"] for t in server.get("/api/v2/dags/helixflow/tasks")["tasks"]]
        assert {"stage", "validate", "split", "tokenize", "embed", "report", "summary"} <= set(tasks)

        if shutil.which("chromium") or os.environ.get("CI") == "true":
            require_service("chromium", "the DAG graph screenshot")
            shot = PROJECT_DIR / "docs" / "images" / "airflow-dag-graph.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([AIRFLOW_VENV / "bin" / "python", PROJECT_DIR / "ci" / "airflow-dag-screenshot.py",
                                   server.base_url, "helixflow", shot], capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
            assert shot.stat().st_size > 20_000


def test_local_execution_runs_the_same_stages_without_docker(tmp_path):
    """HELIXFLOW_EXECUTION=local: the same DAG with the stages as local processes (no Docker API)."""
    require_airflow()
    helixflow = shutil.which("helixflow")
    data, results, home = tmp_path / "data", tmp_path / "results", tmp_path / "home"
    subprocess.run([helixflow, "demo-data", data / "cells.h5ad", "--cells", "300", "--seed", "4"], check=True,
                   capture_output=True)
    env = local_env(home, data, results, helixflow)
    init_db(env)
    conf = {"input": "cells.h5ad", "model": "tiny", "stages": LOCAL_STAGES}
    run = dags_test(env, conf)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert (results / "cells" / "embeddings" / "embeddings.h5ad").is_file()
    assert not (results / "cells" / "report.html").exists()  # the report stage was not selected
    assert "'cells': 300" in output


def test_slurm_param_hands_the_stage_to_a_slurm_profile():
    require_airflow()
    code = ("import json, sys; sys.path.insert(0, 'airflow/dags'); import helixflow as dag; "
            "params = {'input': 'a.h5ad', 'model': 'tiny', 'run_name': '', 'workflow_profile': 'slurm'}; "
            "print(json.dumps(dag.stage_command(params, 'embed', '/data', '/results', '/data/models', 2)))")
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    command = json.loads(done.stdout.strip().splitlines()[-1])
    assert command[:2] == ["run", "/data/a.h5ad"] and command[-2:] == ["--workflow-profile", "slurm"]
    assert command[command.index("--until") + 1] == "embed"
