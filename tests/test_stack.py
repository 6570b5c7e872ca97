"""The compose stack as its users run it: `docker compose build`, `up -d --wait`, the Airflow UI, `down -v`.

Docker Compose v2 against podman's Docker API; the project's images built from the repository's
Dockerfiles by `docker compose build` in a clone (tests/compose_stack.py), stand-ins of the
third-party images. In headless Chromium the test signs in, finds the helixflow DAG, fills the
trigger form and triggers a run; the scheduler and the LocalExecutor run every stage in sibling
containers through the Docker API guard. A second run comes from the schedule, a third, on an
invalid file, fails with helixflow's error in its task log in the UI. MLflow's REST API and the
stack's own Prometheus hold what the runs recorded. A dataset uploaded to the S3 inbox (moto's
server standing in for MinIO) becomes one run whose results go to the bucket. Screenshots go to
docs/images/.

Needs podman (+ runc, debootstrap), Compose v2 (`make compose`), chromium and .venv-airflow;
skipped on a user's machine without them, failing under CI=true. Slow: the first image builds take
many minutes (cached layers after that); the runs take minutes each on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from airflow_helpers import AIRFLOW_VENV, require_airflow
from compose_stack import RESULTS_UID, UNLABELLED, ComposeProject
from conftest import PROJECT_DIR, require_service, sha256

pytestmark = pytest.mark.slow

DAG = "helixflow"
IMAGES = PROJECT_DIR / "docs" / "images"
RUN_TIMEOUT_S = 5400  # safety only: a run of the .test data takes minutes
UI_RUN = {"input": "test.h5ad", "run_name": "from-ui", "chunk_size": "200"}
BAD_RUN = {"input": "bad.h5ad", "run_name": "bad-input"}


class Rest:
    """Airflow's REST API with a token of the admin user (password from the .env)."""

    def __init__(self, base_url: str, password: str):
        self.base_url = base_url
        body = json.dumps({"username": "admin", "password": password}).encode()
        request = urllib.request.Request(f"{base_url}/auth/token", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            self.token = json.load(response)["access_token"]

    def call(self, path: str, method: str = "GET", body: dict | None = None):
        request = urllib.request.Request(f"{self.base_url}{path}", json.dumps(body).encode() if body else None,
                                         {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
                                         method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    def runs(self) -> list[dict]:
        """The DAG's runs, oldest first."""
        return sorted(self.call(f"/api/v2/dags/{DAG}/dagRuns?limit=100")["dag_runs"], key=lambda r: r["run_after"])

    def summary(self, run_id: str) -> dict:
        """The summary task's XCom, as JSON."""
        run_id = urllib.parse.quote(run_id, safe="")
        value = self.call(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/summary/xcomEntries/return_value"
                          "?deserialize=true&stringify=false")["value"]
        return value if isinstance(value, dict) else json.loads(value)

    def wait_for_run(self, match, what: str) -> dict:
        """Poll until the first run with ``match(run)`` has finished; that run."""
        def finished() -> dict | None:
            found = [r for r in self.runs() if match(r)]
            return found[0] if found and found[0]["state"] in ("success", "failed") else None

        return wait_until(finished, f"finished {what}", every=3)

    def task_log(self, run_id: str, task_id: str, try_number: int = 1) -> str:
        """A task instance's log as text (the REST API's structured log events, one per line)."""
        run_id = urllib.parse.quote(run_id, safe="")
        content = self.call(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
                            "?full_content=true")["content"]
        return "\n".join(log_line(e) for e in content)

    def tasks(self, run_id: str) -> dict[str, str]:
        run_id = urllib.parse.quote(run_id, safe="")
        instances = self.call(f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in instances}

    def why_failed(self, run_id: str) -> str:
        """A run's task states and the end of each failed task's log (an assertion message)."""
        tasks = self.tasks(run_id)
        logs = [f"--- {task}:\n{self.task_log(run_id, task)[-3000:]}" for task, state in tasks.items() if state == "failed"]
        return "\n".join([json.dumps(tasks), *logs])


def log_line(event) -> str:
    """One structured log event as text: its message, and the exception when it carries one."""
    if not isinstance(event, dict):
        return str(event)
    errors = [f"{e.get('exc_type')}: {e.get('exc_value')} (at {(e.get('frames') or [{}])[-1]})"
              for e in event.get("error_detail") or [] if isinstance(e, dict)]
    return " ".join([str(event.get("event", event)), *errors])


def ui(script: str, *args: str, timeout: float = 1800) -> str:
    """Run a Playwright snippet with the Airflow environment's python (Playwright lives there)."""
    code = f"import json, sys; sys.path.insert(0, {str(PROJECT_DIR / 'tests')!r}); from airflow_ui import *\n{script}"
    done = subprocess.run([AIRFLOW_VENV / "bin" / "python", "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done.stdout


@pytest.fixture(scope="module")
def stack(compose_project: ComposeProject):
    """`docker compose --profile monitoring up -d --wait` (everything that can run here); `down -v` after."""
    require_airflow()
    require_service("chromium", "the test drives the Airflow UI in headless Chromium")
    services = compose_project.services("monitoring")
    # Exactly one scheduled run: a daily cron whose latest tick is a minute ago. With catchup=False
    # Airflow 3's cron timetable runs the latest tick once the DAG is unpaused (the UI's trigger
    # form unpauses it); the next tick is a day away. (A tick a few minutes ahead gave two runs:
    # yesterday's tick at unpause, then today's.)
    fire = datetime.now(timezone.utc) - timedelta(minutes=1)
    compose_project.set_setting("HELIXFLOW_SCHEDULE", f"{fire.minute} {fire.hour} * * *")
    compose_project.set_setting("HELIXFLOW_DEFAULT_INPUT", UNLABELLED)
    started = time.monotonic()
    up = compose_project.compose("--profile", "monitoring", "up", "-d", "--wait", "--wait-timeout", "1200", *services,
                                 timeout=1500, check=False)
    if up.returncode != 0:
        why = compose_project.failed_services_logs()
        compose_project.compose("--profile", "monitoring", "down", "-v", "--timeout", "30", timeout=600, check=False)
        pytest.fail(f"docker compose up: rc {up.returncode}\n{(up.stdout + up.stderr)[-3000:]}\n{why}")
    print(f"docker compose up -d --wait: {time.monotonic() - started:.0f} s", file=sys.stderr)
    try:
        yield compose_project
    finally:
        compose_project.compose("--profile", "monitoring", "down", "-v", "--timeout", "30", timeout=600, check=False)


@pytest.fixture(scope="module")
def rest(stack) -> Rest:
    return Rest(stack.url("AIRFLOW_PORT"), stack.settings["AIRFLOW_ADMIN_PASSWORD"])


def timestamp(text: str) -> datetime:
    """podman's RFC 3339 times (nanoseconds, trailing zeros cut) as datetimes."""
    match = re.fullmatch(r"(.{19})(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    assert match, text
    fraction = (match.group(2) or "").ljust(6, "0")[:6]
    return datetime.fromisoformat(f"{match.group(1)}.{fraction}{'+00:00' if match.group(3) == 'Z' else match.group(3)}")


def test_images_are_the_ones_compose_built(compose_project):
    """CPU torch in the stage image, no model stack in the Airflow image, users as documented."""
    podman = compose_project.podman
    image = compose_project.settings.get("HELIXFLOW_IMAGE", "helixflow:0.1.0")
    torch = podman.cli("run", "--rm", "--entrypoint", "python", image, "-c",
                       "import torch, os; print(torch.__version__, torch.version.cuda, os.getuid())", check=True)
    version, cuda, uid = torch.stdout.split()
    assert version.endswith("+cpu") and cuda == "None" and uid == "1000", torch.stdout
    airflow = podman.cli("run", "--rm", "--entrypoint", "python", "helixflow-airflow:3.3.2", "-c",
                         "import importlib.util as u, airflow, os; "
                         "print(airflow.__version__, os.getuid(), u.find_spec('torch') is None)", check=True)
    assert airflow.stdout.split() == ["3.3.2", "50000", "True"], airflow.stdout
    mlflow = podman.cli("run", "--rm", "--entrypoint", "mlflow", "helixflow-mlflow:3.17.2", "--version", check=True)
    assert "3.17.2" in mlflow.stdout


def test_a_killed_stacks_dns_file_is_dropped_and_names_resolve_again(compose_project):
    """A network's aardvark-dns file left by a killed stack (another subnet) broke name resolution in
    the next stack; ci/podman-up.sh drops such files and keeps those of running containers."""
    podman = compose_project.podman
    image = compose_project.settings.get("HELIXFLOW_IMAGE", "helixflow:0.1.0")
    dns_dir = Path("/run/containers/networks/aardvark-dns")
    if os.getuid() != 0:
        dns_dir = Path(os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")) / "containers/networks/aardvark-dns"
    network, target = "helixflow-dnscheck", "helixflow-dnscheck-target"
    dns_dir.mkdir(parents=True, exist_ok=True)
    dns_file = dns_dir / network
    dns_file.write_text(f"10.251.7.1\n{'ab' * 32} 10.251.7.2  ghost,ghost\n")
    drop = ["bash", "-c", f". {PROJECT_DIR}/ci/lib.sh && drop_stale_dns_files"]
    try:
        subprocess.run(drop, env=podman.env, check=True)
        assert not dns_file.exists()
        podman.cli("network", "create", network, check=True)
        podman.cli("run", "-d", "--name", target, "--network", network, "--entrypoint", "sleep", image, "300", check=True)
        resolved = podman.cli("run", "--rm", "--network", network, "--entrypoint", "python", image, "-c",
                              f"import socket; print(socket.gethostbyname({target!r}))", check=True)
        assert resolved.stdout.strip().count(".") == 3, resolved.stdout
        subprocess.run(drop, env=podman.env, check=True)
        assert dns_file.exists(), "the file of a running container was dropped"
    finally:
        podman.cli("rm", "-f", "-t", "0", target)
        podman.cli("network", "rm", "-f", network)


def test_up_wait_brings_every_service_to_healthy_in_dependency_order(stack):
    containers = {c["Service"]: c for c in stack.ps()}
    assert set(containers) == set(stack.services("monitoring"))
    for name, container in containers.items():
        if name in ("airflow-init", "helixflow-image"):
            assert container["State"] == "exited" and container["ExitCode"] == 0, container
        else:
            assert container["State"] == "running" and container["Health"] == "healthy", container
    started = {}
    for name, container in containers.items():
        inspect = stack.podman.cli("inspect", container["ID"], check=True)
        state = json.loads(inspect.stdout)[0]["State"]
        started[name], started[f"{name}:finished"] = timestamp(state["StartedAt"]), timestamp(state["FinishedAt"])
    assert started["postgres"] < started["mlflow"] and started["postgres"] < started["airflow-init"]
    assert started["helixflow-image:finished"] < started["airflow-init"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert started["airflow-init:finished"] < started[name], name


def test_run_triggered_in_the_ui_succeeds_through_the_scheduler(stack, rest):
    before = sha256(stack.data / "test.h5ad")
    base = stack.url("AIRFLOW_PORT")
    password = stack.settings["AIRFLOW_ADMIN_PASSWORD"]
    started = time.monotonic()
    ui("with browser() as page:\n"
       "    login(page, sys.argv[1], 'admin', sys.argv[2])\n"
       "    dag_list(page, sys.argv[1], sys.argv[3], Path(sys.argv[4]))\n"
       "    trigger(page, sys.argv[1], sys.argv[3], json.loads(sys.argv[5]), Path(sys.argv[6]))\n",
       base, password, DAG, IMAGES / "airflow-dag-list.png", json.dumps(UI_RUN), IMAGES / "airflow-trigger-form.png")
    finished = rest.wait_for_run(lambda r: (r["conf"] or {}).get("run_name") == "from-ui", "UI-triggered run")
    print(f"UI-triggered run: {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert finished["state"] == "success" and finished["run_type"] == "manual", rest.why_failed(finished["dag_run_id"])
    tasks = rest.tasks(finished["dag_run_id"])
    assert tasks.pop("annotate") == "skipped", tasks  # param annotate is empty
    assert tasks.pop("upload") == "skipped", tasks  # a local input: its results stay in the results folder
    assert set(tasks.values()) == {"success"}, tasks

    out = stack.results / "from-ui"
    for relative in ("embeddings/embeddings.h5ad", "report.html", "qc/input_check.json",
                     "report/embedding_summary.json", "pipeline_info/execution_trace.tsv", "finetune/label_split.tsv",
                     "finetune/model/config.json", "evaluate/metrics.json", "evaluate/confusion_matrix.png"):
        assert (out / relative).is_file(), relative
        assert (out / relative).stat().st_uid == RESULTS_UID, relative  # the results folder's owner, not root
    assert sha256(stack.data / "test.h5ad") == before
    assert sorted(p.name for p in stack.data.iterdir()) == ["bad.h5ad", "models", "test.h5ad", UNLABELLED]

    summary = rest.summary(finished["dag_run_id"])
    assert summary["cells"] == 600 and summary["genes"] == 1640 and summary["metrics"], summary
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    finetune = summary["finetune"]
    assert finetune["heldout_accuracy"] == pytest.approx(metrics["fine_tuned"]["accuracy"])
    assert finetune["heldout_macro_f1"] == pytest.approx(metrics["fine_tuned"]["macro_f1"])
    assert finetune["probe_accuracy"] == pytest.approx(metrics["linear_probe"]["accuracy"])
    assert metrics["fine_tuned"]["accuracy"] > metrics["chance_accuracy"]

    # The task logs are readable in the UI; a picture of the finished run's graph.
    # Each fine-tuning step ran in a stage container of its own, resuming from the files before it.
    for stage in ("label_split", "finetune", "evaluate"):
        log = rest.task_log(finished["dag_run_id"], stage)
        assert f"label_column=cell_type --until {stage}" in log and "helixflow container: helixflow-helixflow-" in log
    assert "nothing to annotate: param annotate is empty" in rest.task_log(finished["dag_run_id"], "annotate")
    ui("with browser() as page:\n"
       "    login(page, sys.argv[1], 'admin', sys.argv[2])\n"
       "    print(task_log(page, sys.argv[1], sys.argv[3], sys.argv[4], 'embed', 'helixflow container:'))\n"
       "    run_graph(page, sys.argv[1], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), Path(sys.argv[6]))\n",
       base, password, DAG, finished["dag_run_id"], json.dumps(sorted([*tasks, "annotate", "upload"])),
       IMAGES / "airflow-run-graph.png")
    for shot in ("airflow-dag-list.png", "airflow-trigger-form.png", "airflow-run-graph.png"):
        assert (IMAGES / shot).stat().st_size > 20_000, shot
    # Every stage container of this run removed (the scheduled run may still be running beside it).
    left = stack.podman.cli("ps", "-aq", "--filter", f"label=helixflow.run={UI_RUN['run_name']}", check=True)
    assert left.stdout.strip() == ""


def mlflow_get(base_url: str, endpoint: str, **params) -> dict:
    with urllib.request.urlopen(f"{base_url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params, doseq=True)}",
                                timeout=60) as response:
        return json.load(response)


def test_mlflow_server_holds_the_fine_tune_of_the_ui_run(stack, rest):
    """Params, per-epoch metrics, held-out accuracy and macro-F1 and the model, over MLflow's REST API."""
    finished = next(r for r in rest.runs() if (r["conf"] or {}).get("run_name") == "from-ui")
    finetune = rest.summary(finished["dag_run_id"])["finetune"]
    assert "skipped" not in finetune, finetune
    base = stack.url("MLFLOW_PORT")
    tracked = mlflow_get(base, "runs/get", run_id=finetune["mlflow_run_id"])["run"]
    params = {p["key"]: p["value"] for p in tracked["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in tracked["data"]["metrics"]}
    assert tracked["info"]["status"] == "FINISHED" and params["profile"] == "tiny", params
    assert metrics["heldout_accuracy"] == pytest.approx(finetune["heldout_accuracy"])
    assert metrics["heldout_macro_f1"] == pytest.approx(finetune["heldout_macro_f1"])
    assert {"train.epochs", "optimizer_steps"} <= set(params) and {"train_loss", "validation_accuracy"} <= set(metrics)
    history = mlflow_get(base, "metrics/get-history", run_id=finetune["mlflow_run_id"], metric_key="validation_accuracy")
    epochs = int(params["train.epochs"])
    assert len(history["metrics"]) == epochs and all(0 <= m["value"] <= 1 for m in history["metrics"]), history
    artifacts = {a["path"] for a in mlflow_get(base, "artifacts/list", run_id=finetune["mlflow_run_id"]).get("files", [])}
    assert {"model", "evaluation"} <= artifacts, artifacts
    model_files = mlflow_get(base, "artifacts/list", run_id=finetune["mlflow_run_id"], path="model").get("files", [])
    assert "model/config.json" in {f["path"] for f in model_files}, model_files


def test_invalid_dataset_shows_the_helixflow_error_in_the_task_log_in_the_ui(stack, rest):
    base = stack.url("AIRFLOW_PORT")
    password = stack.settings["AIRFLOW_ADMIN_PASSWORD"]
    ui("with browser() as page:\n"
       "    login(page, sys.argv[1], 'admin', sys.argv[2])\n"
       "    trigger(page, sys.argv[1], sys.argv[3], json.loads(sys.argv[4]))\n",
       base, password, DAG, json.dumps(BAD_RUN))
    failed = rest.wait_for_run(lambda r: (r["conf"] or {}).get("run_name") == "bad-input", "run on an invalid file")
    tasks = rest.tasks(failed["dag_run_id"])
    # The first stage checks the input before anything else runs.
    assert failed["state"] == "failed" and tasks["stage"] == "failed", tasks
    log = ui("with browser() as page:\n"
             "    login(page, sys.argv[1], 'admin', sys.argv[2])\n"
             "    print(task_log(page, sys.argv[1], sys.argv[3], sys.argv[4], 'stage', 'helixflow: error'))\n",
             base, password, DAG, failed["dag_run_id"])
    assert "/data/bad.h5ad: not an .h5ad file" in log
    assert not (stack.results / "bad-input" / "embeddings").exists()


def test_a_run_comes_from_the_schedule(stack, rest):
    scheduled = rest.wait_for_run(lambda r: r["run_type"] == "scheduled", "scheduled run")
    assert scheduled["state"] == "success", rest.why_failed(scheduled["dag_run_id"])
    # The default params: the input of HELIXFLOW_DEFAULT_INPUT, without labels, so embedded and reported only.
    assert (stack.results / "unlabelled" / "report.html").is_file()
    assert rest.tasks(scheduled["dag_run_id"])["finetune"] == "skipped"
    assert [r["run_type"] for r in rest.runs()].count("scheduled") == 1  # the cron's next tick is a day away
    rest.call(f"/api/v2/dags/{DAG}", method="PATCH", body={"is_paused": True})


def test_prometheus_holds_task_successes_and_step_metrics(stack):
    from prometheus_stack import query

    url = stack.url("PROMETHEUS_PORT")
    deadline = time.monotonic() + 300  # scrape interval 15 s
    while True:
        successes = query(url, f'sum(airflow_task_status{{dag_id="{DAG}", status="success"}})')
        steps = query(url, 'helixflow_step_success{run="from-ui"} == 1')
        if successes and float(successes[0]["value"][1]) > 0 and steps:
            break
        assert time.monotonic() < deadline, (successes, steps)
        time.sleep(3)
    assert {"validate_input", "tokenize", "embed"} <= {s["metric"]["step"] for s in steps}
    targets = {t["labels"]["job"]: t["health"] for t in
               json.load(urllib.request.urlopen(f"{url}/api/v1/targets", timeout=30))["data"]["activeTargets"]}
    assert targets["airflow"] == "up" and targets["pushgateway"] == "up" and targets["node"] == "up", targets


def wait_until(condition, what: str, timeout: float = RUN_TIMEOUT_S, every: float = 0.5):
    """Poll ``condition()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(every)
    return value


def test_a_fine_tune_marked_failed_stops_at_once_and_its_rerun_resumes_from_the_checkpoint(stack, rest):
    """Mark the running finetune task failed through the REST API: its container stops within seconds
    (on_kill; tini hands SIGTERM to helixflow); cleared, the task runs again from the last checkpoint.

    The UI run's fine-tune is done again: its model and training log removed, only the finetune
    stage selected (the stack's tiny profile checkpoints every 10 of its 60 optimizer steps).
    """
    out = stack.results / "from-ui" / "finetune"
    shutil.rmtree(out / "model")
    (out / "training_log.tsv").unlink()
    rest.call(f"/api/v2/dags/{DAG}", method="PATCH", body={"is_paused": False})
    conf = {"input": "test.h5ad", "run_name": "from-ui", "chunk_size": 200, "stages": ["finetune"]}
    run_id = rest.call(f"/api/v2/dags/{DAG}/dagRuns", method="POST", body={"logical_date": None, "conf": conf})["dag_run_id"]
    wait_until(lambda: (out / "checkpoints" / "latest").is_file(), "fine-tuning checkpoint")
    running = ["ps", "-q", "--filter", f"label=helixflow.dag={DAG}", "--filter", "label=helixflow.stage=finetune"]
    assert stack.podman.cli(*running, check=True).stdout.strip()
    task = f"/api/v2/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/finetune"
    marked = time.monotonic()
    rest.call(task, method="PATCH", body={"new_state": "failed"})
    wait_until(lambda: not stack.podman.cli(*running, check=True).stdout.strip(), "stop of the finetune container",
               timeout=300)
    took = time.monotonic() - marked
    print(f"finetune container gone {took:.0f} s after the task was marked failed", file=sys.stderr)
    assert took < 60
    assert (out / "checkpoints" / "latest").is_file() and not (out / "model").exists()

    rest.call(f"/api/v2/dags/{DAG}/clearTaskInstances", method="POST",
              body={"dry_run": False, "dag_run_id": run_id, "task_ids": ["finetune"], "only_failed": True})
    state = wait_until(lambda: {"success", "failed"} & {rest.tasks(run_id)["finetune"]}, "finetune rerun", every=3)
    log = rest.task_log(run_id, "finetune", try_number=2)
    assert state == {"success"} and "--until finetune" in log, log[-4000:]
    # The step's own log (the rule's log file, not the task log, which has snakemake's lines).
    assert "helixflow: resumed at optimizer step" in (out.parent / "logs" / "finetune.log").read_text()
    assert (out / "model" / "config.json").is_file() and not (out / "checkpoints").exists()
    rest.call(f"/api/v2/dags/{DAG}", method="PATCH", body={"is_paused": True})


S3_INBOX_DAG = "helixflow_s3_inbox"
S3_BUCKET = "helixflow"  # compose.yaml's HELIXFLOW_S3_INBOX and HELIXFLOW_S3_RESULTS
S3_KEY = "inbox/arrivals/cells.h5ad"


def s3_client(stack: ComposeProject):
    """boto3 against the stack's S3 port, with the credentials of the .env."""
    import boto3

    session = boto3.session.Session(aws_access_key_id=stack.settings["S3_ROOT_USER"],
                                    aws_secret_access_key=stack.settings["S3_ROOT_PASSWORD"], region_name="us-east-1")
    return session.client("s3", endpoint_url=stack.url("S3_PORT"))


def s3_inbox_polls(rest: Rest, since: datetime) -> list[dict]:
    """The S3 inbox's finished runs that started after `since`."""
    runs = rest.call(f"/api/v2/dags/{S3_INBOX_DAG}/dagRuns?limit=100")["dag_runs"]
    return [r for r in runs if r["state"] in ("success", "failed") and r["start_date"]
            and datetime.fromisoformat(r["start_date"]) > since]


def s3_inbox_runs(rest: Rest) -> list[dict]:
    return [r for r in rest.runs() if r["dag_run_id"].startswith("s3inbox__")]


def test_an_object_uploaded_to_the_s3_inbox_gives_one_scheduled_run_and_results_under_the_results_prefix(stack, rest):
    """A multipart upload to s3://helixflow/inbox/: no run while it is open; once completed, the
    inbox's next scheduled poll starts exactly one helixflow run, whose results end up under
    results/<run name>/ with _SUCCESS last; later polls start no second run."""
    client = s3_client(stack)
    upload = client.create_multipart_upload(Bucket=S3_BUCKET, Key=S3_KEY)
    part = client.upload_part(Bucket=S3_BUCKET, Key=S3_KEY, UploadId=upload["UploadId"], PartNumber=1,
                              Body=(stack.data / UNLABELLED).read_bytes())
    unpaused = datetime.now(timezone.utc)
    for dag_id in (DAG, S3_INBOX_DAG):
        rest.call(f"/api/v2/dags/{dag_id}", method="PATCH", body={"is_paused": False})
    polls = wait_until(lambda: s3_inbox_polls(rest, unpaused), "poll of the S3 inbox", every=3)
    assert {poll["state"] for poll in polls} == {"success"} and polls[0]["run_type"] == "scheduled", polls
    assert s3_inbox_runs(rest) == []  # the open upload is not listed

    client.complete_multipart_upload(Bucket=S3_BUCKET, Key=S3_KEY, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    started = time.monotonic()
    finished = rest.wait_for_run(lambda r: r["dag_run_id"].startswith("s3inbox__"), "run of the S3 inbox's object")
    print(f"run of an object uploaded to the S3 inbox: {time.monotonic() - started:.0f} s", file=sys.stderr)
    assert finished["state"] == "success", rest.why_failed(finished["dag_run_id"])
    run_name = finished["conf"]["run_name"]
    assert finished["conf"]["input"] == f"s3://{S3_BUCKET}/{S3_KEY}" and run_name.startswith("arrivals-cells-")
    assert rest.summary(finished["dag_run_id"])["results_url"] == f"s3://{S3_BUCKET}/results/{run_name}"

    prefix = f"results/{run_name}/"
    objects = {o["Key"][len(prefix):]: o for o in client.list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)["Contents"]}
    manifest = json.loads(client.get_object(Bucket=S3_BUCKET, Key=f"{prefix}_SUCCESS")["Body"].read())
    assert set(objects) == {entry["path"] for entry in manifest["files"]} | {"_SUCCESS"}
    assert {"embeddings/embeddings.h5ad", "report.html", "qc/input_check.json"} <= set(objects)
    assert not [key for key in objects if key.startswith(("finetune/", "evaluate/"))]  # no labels: not fine-tuned
    assert not [key for key in objects if key.startswith((".snakemake/", ".s3-cache/"))]
    assert objects["_SUCCESS"]["LastModified"] >= max(o["LastModified"] for o in objects.values())
    # The credentials reached the stages without showing in a task log or the rendered fields.
    password = stack.settings["S3_ROOT_PASSWORD"]
    stage = rest.call(f"/api/v2/dags/{DAG}/dagRuns/{urllib.parse.quote(finished['dag_run_id'], safe='')}/taskInstances/stage")
    assert password not in json.dumps(stage) and password not in rest.task_log(finished["dag_run_id"], "stage")

    done = datetime.now(timezone.utc)
    wait_until(lambda: s3_inbox_polls(rest, done), "poll of the S3 inbox after the run", every=3)
    assert len(s3_inbox_runs(rest)) == 1  # the same object version starts no second run
    for dag_id in (DAG, S3_INBOX_DAG):
        rest.call(f"/api/v2/dags/{dag_id}", method="PATCH", body={"is_paused": True})


EGRESS_PROBE = """
import urllib.request
print(urllib.request.urlopen("http://pushgateway:9091/-/healthy", timeout=30).status)
try:
    urllib.request.urlopen("https://pypi.org/simple/", timeout=30)
    print("egress")
except OSError as error:
    print("no egress:", error)
"""


def test_the_stages_network_reaches_the_pushgateway_and_nothing_outside(stack):
    network = stack.settings.get("HELIXFLOW_STAGE_NETWORK", "helixflow-metrics")
    assert json.loads(stack.podman.cli("network", "inspect", network, check=True).stdout)[0]["internal"] is True
    image = stack.settings.get("HELIXFLOW_IMAGE", "helixflow:0.1.0")
    probe = stack.podman.cli("run", "--rm", "--network", network, "--entrypoint", "python", image, "-c", EGRESS_PROBE,
                             check=True)
    assert probe.stdout.split("\n")[0] == "200" and "no egress:" in probe.stdout, probe.stdout


# Container creates that would own the host, each refused by the guard (docs/airflow.md, Security).
ESCALATIONS = {
    "privileged": {"HostConfig": {"Privileged": True}},
    "host root bound": {"HostConfig": {"Binds": ["/:/host"]}},
    "cap_add": {"HostConfig": {"CapAdd": ["SYS_ADMIN"]}},
    "host pid": {"HostConfig": {"PidMode": "host"}},
    "device": {"HostConfig": {"Devices": [{"PathOnHost": "/dev/kmsg", "PathInContainer": "/dev/kmsg",
                                           "CgroupPermissions": "rwm"}]}},
    "other image": {"Image": "localhost/debian:bookworm"},
}
GUARD_PROBE = """
import json, sys, urllib.error, urllib.request
def call(method, path, body=None):
    request = urllib.request.Request("http://docker-guard:2375/v1.41" + path, json.dumps(body).encode() if body else None,
                                     {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
image, other = sys.argv[1], sys.argv[2]
codes = {name: call("POST", "/containers/create", {"Image": image, "Cmd": ["true"], **extra})
         for name, extra in json.loads(sys.argv[3]).items()}
codes["exec"] = call("POST", f"/containers/{other}/exec", {"Cmd": ["env"]})
codes["archive get"] = call("GET", f"/containers/{other}/archive?path=/etc")
codes["inspect"] = call("GET", f"/containers/{other}/json")
codes["pull"] = call("POST", "/images/create?fromImage=alpine&tag=latest")
codes["ping"] = call("GET", "/_ping")
print(json.dumps(codes))
"""


def test_the_stacks_guard_refuses_escalations_and_only_the_scheduler_reaches_it(stack):
    """The guard that the runs above went through refuses what would own the host; nothing is created."""
    podman = stack.podman
    postgres = next(c["ID"] for c in stack.ps() if c["Service"] == "postgres")
    before = set(podman.cli("ps", "-aq", check=True).stdout.split())
    image = stack.settings.get("HELIXFLOW_IMAGE", "helixflow:0.1.0")
    probe = stack.compose("exec", "-T", "airflow-scheduler", "python", "-c", GUARD_PROBE, image, postgres,
                          json.dumps(ESCALATIONS), timeout=300)
    codes = json.loads(probe.stdout.strip().splitlines()[-1])
    assert codes.pop("ping") == 200
    assert codes == {name: 403 for name in codes} and len(codes) == len(ESCALATIONS) + 4, codes
    assert set(podman.cli("ps", "-aq", check=True).stdout.split()) == before
    # The api-server, which runs no tasks, is not on the guard's network.
    unreachable = stack.compose("exec", "-T", "airflow-apiserver", "python", "-c", GUARD_PROBE, image, postgres, "{}",
                                timeout=300, check=False)
    assert unreachable.returncode != 0 and "docker-guard" not in unreachable.stdout, unreachable.stdout


def test_down_removes_every_container_volume_and_network(stack):
    stack.compose("--profile", "monitoring", "down", "-v", "--timeout", "30", timeout=600)
    label = "label=com.docker.compose.project=helixflow"
    assert stack.podman.cli("ps", "-aq", "--filter", label, check=True).stdout.strip() == ""
    assert stack.podman.cli("volume", "ls", "-q", "--filter", label, check=True).stdout.strip() == ""
    networks = stack.podman.cli("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()
    assert set(networks) <= {"podman"}, networks
