"""The Airflow DAG for real: podman's Docker API, the CPU image, `airflow dags test`, the api-server.

Needs podman (+ runc, debootstrap) and the Airflow environment (.venv-airflow, `make airflow-venv`);
skipped on a user's machine without them, failing under CI=true. Slow: the first image build takes
minutes (cached layers after that).
"""

from __future__ import annotations

import json
import os
import re
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

# HELIXFLOW_TEST_IMAGE: a tag of one's own where several checkouts share one podman storage.
IMAGE = os.environ.get("HELIXFLOW_TEST_IMAGE", "localhost/helixflow:0.1.0")
LOCAL_STAGES = ["stage", "validate", "split", "tokenize", "embed"]
FINETUNE_STAGES = ["label_split", "finetune", "evaluate"]
STAGES_TIMEOUT_S = 3600  # a safety limit for a whole DAG run, far above the slowest seen (about 20 min)

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


def test_image_has_deepspeed_cpu_ops_and_no_compiler(podman, image):
    """DeepSpeed's CPU ops were compiled at build time; the image has no compiler to build them later."""
    compilers = podman_cli(podman, "run", "--rm", "--entrypoint", "sh", image, "-c",
                           "for cc in cc gcc g++ c++ x86_64-linux-gnu-gcc; do command -v $cc; done; true")
    assert compilers.returncode == 0 and compilers.stdout.strip() == "", compilers.stdout + compilers.stderr
    ops = podman_cli(podman, "run", "--rm", "--network", "none", image, "python", "-c",
                     "from deepspeed.ops.op_builder import CPUAdamBuilder, ShareMemCommBuilder; "
                     "print(CPUAdamBuilder().load().__name__, ShareMemCommBuilder().load().__name__)")
    assert ops.returncode == 0, ops.stdout + ops.stderr
    assert ops.stdout.split() == ["deepspeed.ops.adam.cpu_adam_op", "deepspeed.ops.comm.deepspeed_shm_comm_op"], ops.stdout


def test_image_plans_a_slurm_run(podman, image, tmp_path):
    """The slurm* choices of the DAG's form work from the image: SLURM client, munge, executor plugin."""
    # (sbatch --version already wants a slurm.conf: the cluster's, mounted at run time.)
    tools = podman_cli(podman, "run", "--rm", "--entrypoint", "sh", image, "-c",
                       "for tool in sbatch squeue scancel munge; do command -v $tool; done && munge --version")
    assert tools.returncode == 0 and len(tools.stdout.splitlines()) == 5, tools.stdout + tools.stderr
    subprocess.run([shutil.which("helixflow"), "demo-data", tmp_path / "cells.h5ad", "--cells", "200"], check=True,
                   capture_output=True)
    tmp_path.chmod(0o755)
    (tmp_path / "cells.h5ad").chmod(0o644)
    for profile in ("slurm", "slurm-gpu"):
        plan = podman_cli(podman, "run", "--rm", "--network", "none", "-v", f"{tmp_path}:/data:ro", image, "run",
                          "/data/cells.h5ad", "--model", "tiny", "--models-dir", "/opt/helixflow-models", "--out",
                          "/home/helix/results", "--workflow-profile", profile, "--dry-run")
        assert plan.returncode == 0, (plan.stdout + plan.stderr)[-4000:]
        assert "finetune" in plan.stdout + plan.stderr



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
    # The same kind of cells without any obs column: nothing to fine-tune on.
    subprocess.run([helixflow, "demo-data", data / "unlabelled.h5ad", "--cells", "300", "--seed", "5"], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-c", "import anndata, sys; a = anndata.read_h5ad(sys.argv[1]); "
                    "a.obs = a.obs[[]]; a.write_h5ad(sys.argv[1])", data / "unlabelled.h5ad"], check=True)
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
                      HELIXFLOW_TEST_LABEL="1",
                      # No network for the stages: fine-tuning needs neither downloads nor a JIT build.
                      HELIXFLOW_STAGE_NETWORK="none",
                      # The MLflow store the DAG hands to the stages (a server URI in compose).
                      HELIXFLOW_MLFLOW_TRACKING_URI="/results/mlruns")
    init_db(env)
    return {"env": env, "data": data, "results": results, "home": home}


def task_logs(stack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (stack["home"] / "logs").rglob("*.log"))


def summary_value(output: str, key: str) -> str:
    """A value of the summary's XCom, as the task logs its return value."""
    found = re.findall(rf"'{key}': ('[^']*'|[0-9.e-]+)", output)
    assert found, f"no {key!r} in the summary's return value"
    return found[-1].strip("'")


def test_dag_fine_tunes_and_evaluates_in_containers(stack):
    before = sha256(stack["data"] / "test.h5ad")
    started = time.monotonic()
    # 10 containers, fine-tuning among them: 20 minutes on a 2-core machine loaded by other work.
    run = dags_test(stack["env"], {"input": "test.h5ad", "model": "tiny", "run_name": "ok"}, timeout=STAGES_TIMEOUT_S)
    print(f"dags test (10 stages, fine-tuning): {time.monotonic() - started:.0f} s", file=sys.stderr)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    out = stack["results"] / "ok"
    for relative in ("embeddings/embeddings.h5ad", "report.html", "qc/input_check.json",
                     "report/embedding_summary.json", "pipeline_info/execution_trace.tsv", "finetune/label_split.tsv",
                     "finetune/model/config.json", "evaluate/metrics.json", "evaluate/confusion_matrix.png"):
        assert (out / relative).is_file(), relative
    assert "'cells': 600, 'genes': 1640" in output  # the summary's XCom, as the task logs its return value
    # Each fine-tuning step ran in its own stage container, resuming from the files before it.
    logs = output + task_logs(stack)
    for stage in FINETUNE_STAGES:
        assert f"label_column=cell_type --until {stage}" in logs, stage  # the snakemake command line of its container
    assert "nothing to annotate: param annotate is empty" in logs
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert float(summary_value(output, "heldout_accuracy")) == pytest.approx(metrics["fine_tuned"]["accuracy"])
    assert float(summary_value(output, "heldout_macro_f1")) == pytest.approx(metrics["fine_tuned"]["macro_f1"])
    assert float(summary_value(output, "probe_accuracy")) == pytest.approx(metrics["linear_probe"]["accuracy"])
    assert summary_value(output, "model") == str(out / "finetune" / "model")
    assert metrics["fine_tuned"]["accuracy"] > metrics["chance_accuracy"]
    # The stages tracked the fine-tune in the store the DAG handed them (MLFLOW_TRACKING_URI).
    run_id = summary_value(output, "mlflow_run_id")
    run_dirs = list((stack["results"] / "mlruns").glob(f"*/{run_id}"))
    assert len(run_dirs) == 1, sorted(p.name for p in (stack["results"] / "mlruns").iterdir())
    recorded = run_dirs[0]
    assert {"profile", "train.epochs", "optimizer_steps"} <= {p.name for p in (recorded / "params").iterdir()}
    assert {"train_loss", "validation_accuracy", "heldout_accuracy", "heldout_macro_f1"} <= {
        p.name for p in (recorded / "metrics").iterdir()}
    epochs = (recorded / "metrics" / "validation_accuracy").read_text().split("\n")
    assert len([line for line in epochs if line.strip()]) == 2  # one record per epoch of the tiny profile
    assert (recorded / "artifacts" / "model" / "config.json").is_file()
    assert (stack["results"] / "ok" / "mlruns").exists() is False
    assert sha256(stack["data"] / "test.h5ad") == before
    assert sorted(p.name for p in stack["data"].iterdir()) == ["bad.h5ad", "models", "test.h5ad", "unlabelled.h5ad"]
    assert podman_cli(stack["env"], "ps", "-aq", "--filter", "label=helixflow.test=1").stdout.strip() == ""
    # The data folder is mounted read-only: a container cannot write into it.
    write = podman_cli(stack["env"], "run", "--rm", "-v", f"{stack['data']}:/data:ro", "--entrypoint", "touch",
                       IMAGE, "/data/x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr

    # A second run with the same names (DAG, tasks, run name, results folder) does not conflict:
    # every container is gone, and the new ones are named after the new run id.
    assert "helixflow container: helixflow-helixflow-" in output
    again = dags_test(stack["env"], {"input": "test.h5ad", "model": "tiny", "run_name": "ok"}, timeout=STAGES_TIMEOUT_S)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert podman_cli(stack["env"], "ps", "-aq", "--filter", "label=helixflow.test=1").stdout.strip() == ""


def test_dag_without_labels_gives_embeddings_and_report(stack):
    """An input without the label column: the fine-tuning stages skip, saying why; the rest runs."""
    started = time.monotonic()
    run = dags_test(stack["env"], {"input": "unlabelled.h5ad", "model": "tiny", "run_name": "unlabelled"},
                    timeout=STAGES_TIMEOUT_S)
    print(f"dags test (unlabelled): {time.monotonic() - started:.0f} s", file=sys.stderr)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    out = stack["results"] / "unlabelled"
    for relative in ("embeddings/embeddings.h5ad", "report.html", "report/embedding_summary.json"):
        assert (out / relative).is_file(), relative
    assert not (out / "finetune").exists() and not (out / "evaluate").exists()
    reason = "no fine-tuning: the input unlabelled.h5ad has no obs column 'cell_type' (its obs columns: none)"
    assert reason in output + task_logs(stack)
    assert "'skipped': \"" + reason.removeprefix("no fine-tuning: ") in output
    assert "'cells': 300" in output


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
        assert set(details["params"]) == {"input", "model", "stages", "run_name", "chunk_size", "label_column", "annotate",
                                          "workflow_profile"}
        assert "tiny" in details["params"]["model"]["schema"]["enum"]
        tasks = [t["task_id"] for t in server.get("/api/v2/dags/helixflow/tasks")["tasks"]]
        assert {"stage", "validate", "split", "tokenize", "embed", *FINETUNE_STAGES, "annotate", "report",
                "summary"} <= set(tasks)

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
