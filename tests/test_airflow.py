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
import time

import pytest

from airflow_helpers import (AIRFLOW, AIRFLOW_VENV, airflow_cli, airflow_env, api_server, dags_test,
                             init_db, local_env, require_airflow)
from conftest import PROJECT_DIR, require_service
from test_object_storage import aws_environment, bucket, s3_server  # noqa: F401 - fixtures

# HELIXFLOW_TEST_IMAGE: a tag of one's own where several checkouts share one podman storage.
IMAGE = os.environ.get("HELIXFLOW_TEST_IMAGE", "helixflow:0.1.0")  # compose.yaml's default tag
LOCAL_STAGES = ["stage", "validate", "split", "tokenize", "embed"]
FINETUNE_STAGES = ["label_split", "finetune", "evaluate"]
STAGES_TIMEOUT_S = 3600  # a safety limit for a whole DAG run, far above the slowest seen (about 20 min)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def podman(compose_project) -> dict:
    """The environment of the session's podman service (tests/compose_stack.py: Docker API, healthchecks)."""
    require_airflow()
    return compose_project.podman.env


@pytest.fixture(scope="module")
def image(compose_project) -> str:
    """The CPU image, as `docker compose build` built it once for the session (the tiny model baked in)."""
    return compose_project.settings.get("HELIXFLOW_IMAGE", IMAGE)


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
    # The same kind of cells without their cell types: nothing to fine-tune on.
    subprocess.run([helixflow, "demo-data", data / "unlabelled.h5ad", "--cells", "300", "--seed", "5", "--no-labels"],
                   check=True, capture_output=True)
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


def test_data_mount_is_read_only_for_the_stages(stack):
    """The stages get the data folder read-only: a container cannot write into it.

    (The DAG's whole run with fine-tuning, through the scheduler, is tests/test_stack.py's.)
    """
    write = podman_cli(stack["env"], "run", "--rm", "-v", f"{stack['data']}:/data:ro", "--entrypoint", "touch",
                       IMAGE, "/data/x")
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_stage_container_stops_cleanly_within_seconds_of_sigterm(stack):
    """tini, PID 1 of the image, hands the engine's SIGTERM (`docker stop`, DockerOperator's on_kill) to
    helixflow, which ends snakemake and its jobs: the container exits 143 within seconds, not at the
    engine's SIGKILL after the stop timeout; the same command then resumes and finishes."""
    name = f"hf-sigterm-{os.getpid()}"
    command = ["-v", f"{stack['data']}:/data:ro", "-v", f"{stack['results']}:/results", "-e",
               "HELIXFLOW_WORKDIR=/results/sigterm", IMAGE, "run", "/data/test.h5ad", "--model", "tiny",
               "--models-dir", "/data/models", "--out", "/results/sigterm", "--chunk-size", "100", "--until", "embed",
               "--cores", "2"]
    started = podman_cli(stack["env"], "run", "-d", "--name", name, "--label", "helixflow.test=1", *command)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 600
        while "rule embed" not in (logs := podman_cli(stack["env"], "logs", name)).stdout + logs.stderr:
            assert time.monotonic() < deadline, logs.stdout + logs.stderr
            time.sleep(0.5)
        stopping = time.monotonic()
        stop = podman_cli(stack["env"], "stop", "-t", "60", name)
        took = time.monotonic() - stopping
        state = json.loads(podman_cli(stack["env"], "inspect", name).stdout)[0]["State"]
        logs = podman_cli(stack["env"], "logs", name)
    finally:
        podman_cli(stack["env"], "rm", "-f", name)
    assert stop.returncode == 0, stop.stderr
    assert took < 30 and state["ExitCode"] == 128 + signal.SIGTERM, (took, state, logs.stderr[-3000:])
    assert "helixflow: stopped by SIGTERM" in logs.stdout + logs.stderr
    again = podman_cli(stack["env"], "run", "--rm", "--label", "helixflow.test=1", *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((stack["results"] / "sigterm" / "embeddings" / "chunks").glob("*.h5ad"))) == 6
    assert (stack["results"] / "sigterm" / "embeddings" / "embeddings.h5ad").is_file()


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
    reason = "no fine-tuning: the input unlabelled.h5ad has no obs column 'cell_type' (its obs columns: donor)"
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
    env = airflow_env(tmp_path / "airflow-home", HELIXFLOW_S3_INBOX="s3://helixflow/inbox")
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "dags", "reserialize")
    errors = airflow_cli(env, "dags", "list-import-errors", "-o", "json")
    assert errors.stdout.strip().splitlines()[-1] == "[]", errors.stdout + errors.stderr
    with api_server(env, tmp_path / "api-server.log") as server:
        dags = {dag["dag_id"] for dag in server.get("/api/v2/dags")["dags"]}
        assert {"helixflow", "helixflow_inbox", "helixflow_s3_inbox"} <= dags
        details = server.get("/api/v2/dags/helixflow/details")
        assert set(details["params"]) == {"input", "model", "stages", "run_name", "chunk_size", "label_column", "annotate",
                                          "workflow_profile"}
        assert "tiny" in details["params"]["model"]["schema"]["enum"]
        tasks = [t["task_id"] for t in server.get("/api/v2/dags/helixflow/tasks")["tasks"]]
        assert {"stage", "validate", "split", "tokenize", "embed", *FINETUNE_STAGES, "annotate", "report",
                "upload", "summary"} <= set(tasks)

        if shutil.which("chromium") or os.environ.get("CI") == "true":
            require_service("chromium", "the DAG graph screenshot")
            shot = PROJECT_DIR / "docs" / "images" / "airflow-dag-graph.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([AIRFLOW_VENV / "bin" / "python", PROJECT_DIR / "ci" / "airflow-dag-screenshot.py",
                                   server.base_url, "helixflow", shot], capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
            assert shot.stat().st_size > 20_000


def test_local_execution_runs_the_stages_from_an_s3_input_and_puts_the_results_in_the_bucket(tmp_path, bucket):  # noqa: F811
    """HELIXFLOW_EXECUTION=local: the same DAG with the selected stages as local processes (no Docker
    API). An s3:// input (moto's server): the first stage stages it into the run's folder, the others
    reuse that copy; ``upload`` puts the results under HELIXFLOW_S3_RESULTS/<run>/, _SUCCESS last."""
    require_airflow()
    from helixflow.object_storage import s3_client

    helixflow = shutil.which("helixflow")
    data, results, home = tmp_path / "data", tmp_path / "results", tmp_path / "home"
    subprocess.run([helixflow, "demo-data", tmp_path / "cells.h5ad", "--cells", "300", "--seed", "4"], check=True,
                   capture_output=True)
    client = s3_client()
    client.upload_file(str(tmp_path / "cells.h5ad"), bucket, "inbox/cells.h5ad")
    env = local_env(home, data, results, helixflow, HELIXFLOW_S3_RESULTS=f"s3://{bucket}/results")
    init_db(env)
    run = dags_test(env, {"input": f"s3://{bucket}/inbox/cells.h5ad", "model": "tiny", "stages": LOCAL_STAGES})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert output.count("downloading s3://") == 1 and output.count("cache hit") == len(LOCAL_STAGES) - 1, output[-6000:]
    assert list((results / "cells" / ".s3-cache").glob("*/cells.h5ad"))
    assert (results / "cells" / "embeddings" / "embeddings.h5ad").is_file() and "'cells': 300" in output
    assert not (results / "cells" / "report.html").exists()  # the report stage was not selected

    listed = client.list_objects_v2(Bucket=bucket, Prefix="results/cells/")["Contents"]
    keys = {item["Key"].removeprefix("results/cells/"): item for item in listed}
    manifest = json.loads(client.get_object(Bucket=bucket, Key="results/cells/_SUCCESS")["Body"].read())
    assert set(keys) == {entry["path"] for entry in manifest["files"]} | {"_SUCCESS"}
    assert "embeddings/embeddings.h5ad" in keys and not [k for k in keys if k.startswith((".snakemake/", ".s3-cache/"))]
    assert keys["_SUCCESS"]["LastModified"] >= max(item["LastModified"] for item in listed)


def test_slurm_param_hands_the_stage_to_a_slurm_profile():
    require_airflow()
    code = ("import json, sys; sys.path.insert(0, 'airflow/dags'); import helixflow_dag as dag; "
            "params = {'input': 'a.h5ad', 'model': 'tiny', 'run_name': '', 'workflow_profile': 'slurm'}; "
            "print(json.dumps(dag.stage_command(params, 'embed', '/data', '/results', '/data/models', 2)))")
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    command = json.loads(done.stdout.strip().splitlines()[-1])
    assert command[:2] == ["run", "/data/a.h5ad"] and command[-2:] == ["--workflow-profile", "slurm"]
    assert command[command.index("--until") + 1] == "embed"


def test_s3_input_gives_the_stages_boto3s_settings_and_the_credentials_privately():
    """An s3:// input: the command names it as given; the stages stage it in their run's folder;
    the credentials go to DockerOperator's private environment (not a template field: never rendered)."""
    require_airflow()
    code = """
import json, sys
sys.path.insert(0, 'airflow/dags')
import helixflow_dag as dag
params = {'input': 's3://lab/inbox/a/x.h5ad', 'model': 'tiny', 'run_name': 'a-x'}
settings, credentials = dag.s3_stage_environment(params, '/results')
try:
    dag.input_path({'input': 's3://lab/inbox/x.csv'}, '/data')
except ValueError as error:
    refused = str(error)
print(json.dumps({'command': dag.stage_command(params, 'embed', '/data', '/results', '/data/models', 2),
                  'settings': settings, 'credentials': credentials, 'results_url': dag.results_url(params),
                  'template_fields': list(dag.HelixflowStageOperator.template_fields),
                  'local': dag.s3_stage_environment({'input': 'x.h5ad'}, '/results'), 'refused': refused}))
"""
    env = {**os.environ, "HELIXFLOW_EXECUTION": "docker", "AWS_ENDPOINT_URL_S3": "http://s3:9000", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "secret", "HELIXFLOW_S3_RESULTS": "s3://lab/results/"}
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["command"][:2] == ["run", "s3://lab/inbox/a/x.h5ad"]
    assert answer["command"][answer["command"].index("--out") + 1] == "/results/a-x"  # the upload task puts it on S3
    assert answer["settings"] == {"AWS_ENDPOINT_URL_S3": "http://s3:9000", "AWS_REGION": "us-east-1",
                                  "HELIXFLOW_S3_CACHE": "/results/a-x/.s3-cache"}
    assert answer["credentials"] == {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "secret"}
    assert answer["results_url"] == "s3://lab/results/a-x"
    assert "environment" in answer["template_fields"] and "private_environment" not in answer["template_fields"]
    assert answer["local"] == [{}, {}]
    assert "expected s3://BUCKET/KEY.h5ad" in answer["refused"]


def test_stage_containers_drop_privileges_and_see_only_their_run(tmp_path):
    """The operator's mounts and host config, computed without a Docker daemon (docker-py's own HostConfig)."""
    require_airflow()
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    results.mkdir()
    results.chmod(0o777)
    code = """
import json, sys, types
sys.path.insert(0, 'airflow/dags')
import docker
import helixflow_dag as dag
params = {'input': 'a/x.h5ad', 'model': 'tiny', 'run_name': 'a-x'}
binds = dag.stage_binds(params)
dag.make_results_folders(binds)
operator = dag.make_stage('embed')
# The hook's client without a daemon to ping: the real docker-py client, API version given.
operator.__dict__['hook'] = types.SimpleNamespace(api_client=docker.APIClient(base_url='unix:///nonexistent', version='1.41'))
mounts = [docker.types.Mount(target, source, type='bind', read_only=read_only) for source, target, read_only in binds]
host_config = operator.cli.create_host_config(mounts=mounts, privileged=operator.privileged, cap_add=operator.cap_add)
print(json.dumps({'binds': binds, 'host_config': host_config}))
"""
    env = {**os.environ, "HELIXFLOW_EXECUTION": "docker", "HELIXFLOW_DATA_DIR": str(data),
           "HELIXFLOW_RESULTS_DIR": str(results), "HELIXFLOW_MLFLOW_TRACKING_URI": "/results/mlruns"}
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert [tuple(bind) for bind in answer["binds"]] == [
        (str(data), "/data", True), (f"{results}/a-x", "/results/a-x", False),
        (f"{results}/mlruns", "/results/mlruns", False)]  # the shared MLflow file store the DAG hands on
    for folder in ("a-x", "mlruns"):
        assert (results / folder).stat().st_mode & 0o777 == 0o777  # as writable as the results folder
    host_config = answer["host_config"]
    assert host_config["CapDrop"] == ["ALL"] and host_config["SecurityOpt"] == ["no-new-privileges"]
    assert not host_config.get("Privileged") and not host_config.get("CapAdd")
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in host_config["Mounts"]] == [
        tuple(bind) for bind in answer["binds"]]
