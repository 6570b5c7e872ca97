"""Airflow 3 DAGs that run the helixflow workflow, one task per workflow stage.

``helixflow``        stage -> validate -> split -> tokenize -> embed -> label_split -> finetune
                     -> evaluate -> annotate -> report -> upload -> summary. Each stage task runs
                     ``helixflow run /data/INPUT --until STAGE`` in the helixflow image with
                     DockerOperator (snakemake inside the container resumes from the previous
                     stage's files), then ``summary`` puts the run's cells, metrics, fine-tuning
                     scores and output paths into XCom. The fine-tuning stages run when the
                     input has the label column (param ``label_column``; the validate stage
                     records the input's obs columns); otherwise they skip, saying why, and
                     the run gives embeddings and report. ``annotate`` runs when asked.
                     An input ``s3://BUCKET/KEY.h5ad`` is staged by the stages into the run's
                     folder (``.s3-cache/``, once per run); ``upload`` then puts the run's results
                     under HELIXFLOW_S3_RESULTS/<run name>/, the manifest ``_SUCCESS`` last.
``helixflow_inbox``  data-arrival trigger: polls the watched folder (recursively) and starts one
                     ``helixflow`` run per complete new or changed ``.h5ad`` file (helixflow_inbox.py).
``helixflow_s3_inbox``  the same for the objects under an S3 prefix (helixflow_s3_inbox.py).

Settings (environment of the Airflow services; see docs/airflow.md):
  HELIXFLOW_EXECUTION        docker (default) | local: run the same stages as local processes
  HELIXFLOW_DOCKER_URL       Docker API (the Docker API guard in compose); default $DOCKER_HOST
  HELIXFLOW_DATA_DIR         host folder with the inputs (+ models/), mounted read-only at /data
  HELIXFLOW_RESULTS_DIR      host folder for results; a stage mounts only its run's folder, read-write,
                             at /results/<run name>
  HELIXFLOW_IMAGE / HELIXFLOW_GPU_IMAGE   images for CPU stages / GPU stages of GPU profiles
  HELIXFLOW_PROFILES_DIR     model profiles (default: helixflow's built-in ones, src/helixflow/data/profiles)
  HELIXFLOW_SCHEDULE         cron or preset for helixflow (default: none, manual/inbox only)
  HELIXFLOW_INBOX_SCHEDULE   how often helixflow_inbox looks for new files (default */5 * * * *)
  HELIXFLOW_INBOX_DIR        the watched folder, inside the data folder (default: the data folder)
  HELIXFLOW_INBOX_REQUIRE_DONE  true: a file is complete only with its <name>.done marker (default: also
                             when its size and mtime are unchanged since the previous poll)
  HELIXFLOW_PUSHGATEWAY      Prometheus Pushgateway URL handed to the stages (their step metrics); unset: none
  HELIXFLOW_S3_RESULTS       s3://BUCKET/PREFIX the results of s3:// inputs go to (default: s3://<the input's
                             bucket>/results); the S3 endpoint, region and credentials are boto3's own
                             variables (AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, ...), handed to
                             the stages of s3:// inputs (the credentials as private environment: not rendered)
  HELIXFLOW_STAGE_NETWORK    Docker network of the stage containers (compose: the one of the Pushgateway)
  HELIXFLOW_MLFLOW_TRACKING_URI  MLflow server of the fine-tuning stages (their MLFLOW_TRACKING_URI);
                             unset: a file store in the run's results folder (mlruns/)
  HELIXFLOW_SLURM_CONF_DIR, HELIXFLOW_MUNGE_SOCKET_DIR   host folders with the cluster's slurm.conf and
                             munged's socket, mounted at /etc/slurm and /run/munge for the slurm*
                             workflow profiles (docs/hpc.md)
  HELIXFLOW_RETRIES, HELIXFLOW_STAGE_TIMEOUT_MIN, HELIXFLOW_GPU_POOL, HELIXFLOW_CONTAINER_USER,
  HELIXFLOW_BIN (local mode), HELIXFLOW_CONTAINER_MODELS_DIR (default /data/models), HELIXFLOW_HOST_PROFILES_DIR (host folder of
  profiles mounted read-only at /profiles in the stage containers; default: the image's own)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowSkipException
# helixflow's light modules (no model stack; installed in the Airflow image): the step table and
# the profiles, as the workflow itself reads them.
from helixflow.local_resources import SNAKEMAKE_RESERVE_MB
from helixflow.object_storage import is_s3_url, parse_s3_url
from helixflow.profiles import DEFAULT_PROFILES_DIR, list_profiles, load_profile, step_resources
from helixflow.run_lock import LOCK_NAME
from helixflow.steps import stage_steps, stages

log = logging.getLogger(__name__)
STAGES = stages()
# The fine-tuning stages; the report (the whole workflow) includes their results when they run.
FINETUNE_STAGES = ["label_split", "finetune", "evaluate", "annotate"]
# On the GPU image, with the profile's GPUs, in the GPU pool: the stages with a GPU step.
GPU_STAGES = {stage for stage in STAGES if any(step.gpu for step in stage_steps(stage))}
WORKFLOW_PROFILES = ["default", "slurm", "slurm-gpu", "slurm-apptainer"]

EXECUTION = os.environ.get("HELIXFLOW_EXECUTION", "docker")
PROFILES_DIR = Path(os.environ.get("HELIXFLOW_PROFILES_DIR", DEFAULT_PROFILES_DIR))
DATA_DIR = os.environ.get("HELIXFLOW_DATA_DIR", "/srv/helixflow/data")
RESULTS_DIR = os.environ.get("HELIXFLOW_RESULTS_DIR", "/srv/helixflow/results")
IMAGE = os.environ.get("HELIXFLOW_IMAGE", "localhost/helixflow:0.1.0")
GPU_IMAGE = os.environ.get("HELIXFLOW_GPU_IMAGE", "localhost/helixflow-gpu:0.1.0")
GPU_POOL = os.environ.get("HELIXFLOW_GPU_POOL", "helixflow_gpu")
HOST_PROFILES_DIR = os.environ.get("HELIXFLOW_HOST_PROFILES_DIR")
CONTAINER_MODELS_DIR = os.environ.get("HELIXFLOW_CONTAINER_MODELS_DIR", "/data/models")
LOCAL_MODELS_DIR = os.environ.get("HELIXFLOW_MODELS_DIR", f"{DATA_DIR}/models")
DEFAULT_ARGS = {
    "retries": int(os.environ.get("HELIXFLOW_RETRIES", "2")),
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    "execution_timeout": timedelta(minutes=int(os.environ.get("HELIXFLOW_STAGE_TIMEOUT_MIN", "720"))),
}
# The stages of an s3:// input stage it here, in the run's folder: once per run, the same local path
# for every stage (snakemake resumes only if its input keeps its path and age).
S3_CACHE_FOLDER = ".s3-cache"
# In a run's folder but not results: snakemake's state, the run lock, the staged input.
NOT_RESULTS = frozenset({".snakemake", LOCK_NAME, S3_CACHE_FOLDER})
# boto3's settings and the cache's limit (handed to the stages of s3:// inputs); the credentials (handed privately).
S3_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "HELIXFLOW_S3_CACHE_MAX_GB")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def read_profile(name: str) -> dict:
    """The model profile ``name`` from PROFILES_DIR, checked and completed as the workflow reads it."""
    return load_profile(name, PROFILES_DIR)


def profile_names() -> list[str]:
    """The form's choices of model profile (a choice list may not be empty)."""
    return list_profiles(PROFILES_DIR) or ["tiny"]


def stage_limits(profile: dict, stage: str) -> dict:
    """Container limits of one stage: memory, CPUs, shared memory, GPUs (its heaviest step's resources)."""
    steps = [step_resources(profile, step.name) for step in stage_steps(stage)]
    memory_mb = max(step["mem_mb"] for step in steps)
    # The step's own budget plus room for snakemake itself; shm for torch's data loaders.
    return {"mem_mb": memory_mb + SNAKEMAKE_RESERVE_MB, "cpus": max(step["threads"] for step in steps),
            "shm_mb": max(256, memory_mb // 4), "gpus": max(step.get("gpu", 0) for step in steps)}


def stage_environment() -> dict:
    """Environment the stages get from the Airflow services: Pushgateway and MLflow server, when set."""
    handed = {"HELIXFLOW_PUSHGATEWAY": "HELIXFLOW_PUSHGATEWAY", "HELIXFLOW_MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}
    return {stage_name: os.environ[name] for name, stage_name in handed.items() if os.environ.get(name)}


def s3_stage_environment(params: dict, results_dir: str) -> tuple[dict, dict]:
    """(settings, credentials) a stage needs for an s3:// input, from the Airflow services' environment.

    Both empty for a local input. The staged input goes to the run's own folder (S3_CACHE_FOLDER).
    """
    if not is_s3_url(params["input"]):
        return {}, {}
    settings = {name: os.environ[name] for name in S3_SETTINGS if os.environ.get(name)}
    settings["HELIXFLOW_S3_CACHE"] = f"{results_dir}/{run_name(params)}/{S3_CACHE_FOLDER}"
    return settings, {name: os.environ[name] for name in AWS_CREDENTIALS if os.environ.get(name)}


def local_stage_environment(params: dict) -> dict:
    """What a local stage process adds to the environment it inherits (append_env): stage_environment()
    and, for an s3:// input, boto3's settings; the S3 credentials come inherited, not in this templated field."""
    return {**stage_environment(), **s3_stage_environment(params, RESULTS_DIR)[0]}


def results_url(params: dict) -> str:
    """Where the results of an s3:// input go: HELIXFLOW_S3_RESULTS/<run name> (default prefix: results/ of its bucket)."""
    prefix = os.environ.get("HELIXFLOW_S3_RESULTS") or f"s3://{parse_s3_url(params['input']).bucket}/results"
    return str(parse_s3_url(prefix).child(run_name(params)))


def run_name(params: dict) -> str:
    """Output folder name: the run_name param, else the input file's stem."""
    name = params.get("run_name") or Path(params["input"]).stem
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_', '-'")
    return name


def input_path(params: dict, data_dir: str, key: str = "input") -> str:
    """The dataset of param `key` as a stage opens it: a path in the data folder, or an s3:// input as given."""
    if key == "input" and is_s3_url(params[key]):
        if not parse_s3_url(params[key]).key.endswith(".h5ad"):
            raise ValueError(f"input {params[key]!r}: expected s3://BUCKET/KEY.h5ad")
        return params[key]
    relative = Path(params[key])
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{key} {params[key]!r} must be a path inside the data folder")
    return f"{data_dir}/{relative}"


def read_results_json(params: dict, relative: str) -> dict | None:
    """A JSON file of the run's results folder (as the Airflow services see it), None if absent."""
    path = Path(RESULTS_DIR) / run_name(params) / relative
    return json.loads(path.read_text()) if path.is_file() else None


def label_skip_reason(params: dict) -> str | None:
    """Why this run has no labels to fine-tune on, or None when it has them.

    The label column comes from the params; whether the input has it, from the obs columns that
    the validate stage recorded (qc/input_check.json). Before that file exists, the workflow decides.
    """
    label = params.get("label_column")
    if not label:
        return "no label column: param label_column is empty (embeddings and report only)"
    columns = (read_results_json(params, "qc/input_check.json") or {}).get("obs_columns")
    if columns is not None and label not in columns:
        return (f"the input {params['input']} has no obs column {label!r} (its obs columns: {', '.join(columns) or 'none'});"
                " embeddings and report only")
    return None


def stage_skip_reason(params: dict, stage: str) -> str | None:
    """Why the stage's task skips, or None when it runs."""
    if stage not in params["stages"]:
        return f"stage {stage} not selected"
    if stage in FINETUNE_STAGES:
        reason = label_skip_reason(params)
        if reason:
            return f"no fine-tuning: {reason}"
    if stage == "annotate" and not params.get("annotate"):
        return "nothing to annotate: param annotate is empty"
    return None


def stage_limits_or_skip(params: dict, stage: str, *, log) -> dict:
    """The stage's container limits, or AirflowSkipException with the reason it does not run."""
    reason = stage_skip_reason(params, stage)
    if reason:
        # Airflow's task log says only "Skipping task."; the reason is for the user reading it.
        log.info("%s skipped: %s", stage, reason)
        raise AirflowSkipException(reason)
    return stage_limits(read_profile(params["model"]), stage)


def stage_command(params: dict, stage: str, data_dir: str, results_dir: str, models_dir: str, cores: int,
                  profiles_dir: str | None = None) -> list[str]:
    command = ["run", input_path(params, data_dir), "--model", params["model"], "--out",
               f"{results_dir}/{run_name(params)}", "--models-dir", models_dir, "--until", stage, "--cores", str(cores)]
    if label_skip_reason(params):
        # No label column: no fine-tuning, and an embedding map not coloured by labels.
        command += ["--no-finetune", "--label-column", ""]
    else:
        command += ["--label-column", params["label_column"]]
        if params.get("annotate"):
            command += ["--annotate", input_path(params, data_dir, "annotate")]
    if profiles_dir:
        command += ["--profiles-dir", profiles_dir]
    if params.get("chunk_size"):
        command += ["--chunk-size", str(int(params["chunk_size"]))]
    if params.get("workflow_profile", "default") != "default":
        # Hand the jobs to SLURM: the image needs the SLURM client and munge key (docs/hpc.md).
        command += ["--workflow-profile", params["workflow_profile"]]
    return command


PARAMS = {
    "input": Param(os.environ.get("HELIXFLOW_DEFAULT_INPUT", "test.h5ad"), type="string",
                   title="Input dataset", description="an .h5ad file, relative to the data folder, or s3://BUCKET/KEY.h5ad"
                                                      " (results then also go to HELIXFLOW_S3_RESULTS/<run name>/)"),
    "model": Param(os.environ.get("HELIXFLOW_DEFAULT_MODEL", "tiny"), type="string", enum=profile_names(),
                   title="Model profile", description="src/helixflow/data/profiles/<name>.yaml"),
    "stages": Param(STAGES, type="array", items={"type": "string", "enum": STAGES}, examples=STAGES,
                    title="Stages", description="stages to run; a stage also does any missing earlier work"),
    "run_name": Param(None, type=["null", "string"], title="Run name",
                      description="results folder name under the results folder; default: the input's file name"),
    "chunk_size": Param(None, type=["null", "integer"], minimum=1, title="Cells per chunk"),
    "label_column": Param("cell_type", type="string", title="Label column",
                          description="obs column to fine-tune a cell classifier on (label split, fine-tune, evaluate);"
                                      " empty, or absent from the input: embeddings and report only"),
    "annotate": Param(None, type=["null", "string"], title="Dataset to annotate",
                      description="an .h5ad file in the data folder to label with the fine-tuned model; empty: none"),
    "workflow_profile": Param("default", type="string", enum=WORKFLOW_PROFILES,
                              title="Where the jobs run",
                              description="default: inside the stage's container; slurm*: submitted to the SLURM cluster"),
}


def slurm_mounts(params: dict) -> list[tuple[str, str, bool]]:
    """(host folder, container folder, read-only) a slurm* workflow profile needs in the stage container."""
    if params.get("workflow_profile", "default") == "default":
        return []
    folders = {"HELIXFLOW_SLURM_CONF_DIR": ("/etc/slurm", True), "HELIXFLOW_MUNGE_SOCKET_DIR": ("/run/munge", False)}
    missing = [name for name in folders if not os.environ.get(name)]
    if missing:
        raise ValueError(f"workflow_profile {params['workflow_profile']} submits to SLURM from the stage container: "
                         f"set {' and '.join(missing)} in the Airflow services' environment (docs/hpc.md)")
    return [(os.environ[name], target, read_only) for name, (target, read_only) in folders.items()]


# Host-config options of every stage container (DockerOperator passes neither itself): no Linux
# capabilities (the stages run as an unprivileged user and need none) and no privilege gain
# through setuid binaries.
STAGE_HOST_CONFIG = {"cap_drop": ["ALL"], "security_opt": ["no-new-privileges"]}


def mlflow_store_folder() -> str | None:
    """The shared MLflow file store under /results, when HELIXFLOW_MLFLOW_TRACKING_URI is such a path."""
    path = os.environ.get("HELIXFLOW_MLFLOW_TRACKING_URI", "").removeprefix("file://")
    if not path.startswith("/results/") or ".." in Path(path).parts:
        return None
    relative = Path(path).relative_to("/results")
    return relative.as_posix()


def stage_binds(params: dict) -> list[tuple[str, str, bool]]:
    """(host folder, container folder, read-only) of a stage container.

    The data folder read-only; of the results folder only the run's own folder (the stages write
    nothing else: snakemake's state, the lock and a local MLflow store live in it), plus a shared
    MLflow file store under /results when one is configured; the profiles and SLURM folders when set.
    """
    name = run_name(params)
    binds = [(DATA_DIR, "/data", True), (f"{RESULTS_DIR}/{name}", f"/results/{name}", False)]
    store = mlflow_store_folder()
    if store:
        binds.append((f"{RESULTS_DIR}/{store}", f"/results/{store}", False))
    if HOST_PROFILES_DIR:
        binds.append((HOST_PROFILES_DIR, "/profiles", True))
    return binds + slurm_mounts(params)


def make_results_folders(binds: list[tuple[str, str, bool]]) -> None:
    """Create the writable results folders a stage binds, with the results folder's permissions.

    A bind mount's source must exist. The Airflow services see the results folder at its host
    path; a folder they create gets the mode of the results folder, so the stages' user can
    write wherever it could write the results folder.
    """
    mode = Path(RESULTS_DIR).stat().st_mode & 0o7777
    for source, _, read_only in binds:
        folder = Path(source)
        if not read_only and folder.is_relative_to(RESULTS_DIR) and not folder.is_dir():
            try:
                folder.mkdir(parents=True)
                folder.chmod(mode)
            except PermissionError:
                raise PermissionError(f"{folder}: cannot create the run's results folder; the results folder "
                                      f"{RESULTS_DIR} must be writable by the Airflow services (uid {os.getuid()}) "
                                      "as well as by the stages' user (docs/airflow.md)") from None


def container_name(context, stage: str) -> str:
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "-", context["run_id"])[:80]
    return f"helixflow-{context['dag'].dag_id}-{run_id}-{stage}-try{context['ti'].try_number}"


if EXECUTION == "docker":
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.errors import NotFound
    from docker.types import DeviceRequest, Mount

    class HardenedApiClient:
        """A Docker API client whose host configs carry STAGE_HOST_CONFIG; everything else passes through."""

        def __init__(self, client):
            self._client = client

        def __getattr__(self, name):
            return getattr(self._client, name)

        def create_host_config(self, **options):
            return self._client.create_host_config(**options, **STAGE_HOST_CONFIG)

    class HelixflowStageOperator(DockerOperator):
        """One workflow stage in the helixflow image; limits and GPUs from the run's model profile.

        The container drops every capability, may not gain privileges (STAGE_HOST_CONFIG) and
        sees only its run's results folder (stage_binds).

        Before starting, containers left by earlier tries of the same task (a killed worker) are
        removed; the container name is unique per run, task and try; ``auto_remove='force'`` removes
        it after success or failure, and ``on_kill`` (task killed or timed out) stops and removes it.
        """

        def __init__(self, *, stage: str, **kwargs):
            super().__init__(image=IMAGE, auto_remove="force", mount_tmp_dir=False, **kwargs)
            self.stage = stage

        def execute(self, context):
            params = context["params"]
            limits = stage_limits_or_skip(params, self.stage, log=self.log)
            name = run_name(params)
            self.container_name = container_name(context, self.stage)
            # cAdvisor turns these into container_label_helixflow_* labels (docs/airflow.md, Metrics).
            self.labels = {"helixflow.dag": context["dag"].dag_id, "helixflow.run_id": context["run_id"][:63],
                           "helixflow.stage": self.stage, "helixflow.run": name, "helixflow.model": params["model"],
                           "helixflow.test": os.environ.get("HELIXFLOW_TEST_LABEL", "0")}
            self.mem_limit = f"{limits['mem_mb']}m"
            self.cpus = float(limits["cpus"])
            self.shm_size = limits["shm_mb"] * 1024 * 1024
            if limits["gpus"]:
                self.image = GPU_IMAGE
                self.device_requests = [DeviceRequest(count=limits["gpus"], capabilities=[["gpu"]])]
            self.command = stage_command(params, self.stage, "/data", "/results", CONTAINER_MODELS_DIR, limits["cpus"],
                                         "/profiles" if HOST_PROFILES_DIR else None)
            s3_settings, s3_credentials = s3_stage_environment(params, "/results")
            self.environment = {**(self.environment or {}), **stage_environment(), **s3_settings,
                                "HELIXFLOW_WORKDIR": f"/results/{name}"}
            # DockerOperator's own private environment: passed to the container, never rendered or logged.
            self._private_environment = s3_credentials
            binds = stage_binds(params)
            make_results_folders(binds)
            self.mounts = [Mount(target=target, source=source, type="bind", read_only=read_only)
                           for source, target, read_only in binds]
            self.log.info("helixflow container: %s (%s, %s CPUs, GPUs %s)", self.container_name, self.mem_limit,
                          limits["cpus"], limits["gpus"])
            self._remove_leftovers(context)
            try:
                return super().execute(context)
            except BaseException:
                self._remove_container()
                raise

        @property
        def cli(self):
            return HardenedApiClient(super().cli)

        def _remove_leftovers(self, context):
            """Containers of earlier tries of this task in this run, and any holding our name."""
            stale = self.cli.containers(all=True, filters={"label": [f"helixflow.run_id={context['run_id'][:63]}",
                                                                     f"helixflow.stage={self.stage}"]})
            stale += self.cli.containers(all=True, filters={"name": f"^{self.container_name}$"})
            for container in stale:
                self.log.info("removing leftover container %s", container.get("Names"))
                try:
                    self.cli.remove_container(container["Id"], force=True)
                except NotFound:
                    pass

        def _remove_container(self):
            if self.container is not None:
                try:
                    self.cli.remove_container(self.container["Id"], force=True)
                except Exception:  # noqa: BLE001 - already gone is fine
                    pass

        def on_kill(self):
            super().on_kill()
            self._remove_container()

    def make_stage(stage: str):
        extra = {"pool": GPU_POOL} if stage in GPU_STAGES else {}
        return HelixflowStageOperator(
            task_id=stage, stage=stage, trigger_rule="none_failed",
            docker_url=os.environ.get("HELIXFLOW_DOCKER_URL") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
            user=os.environ.get("HELIXFLOW_CONTAINER_USER") or None, doc_md=f"`helixflow run ... --until {stage}` in the image",
            network_mode=os.environ.get("HELIXFLOW_STAGE_NETWORK") or None,
            **extra,
        )
else:
    from airflow.providers.standard.operators.bash import BashOperator

    class HelixflowLocalStageOperator(BashOperator):
        """One workflow stage as a local ``helixflow run`` process, in the run's results folder."""

        def __init__(self, *, stage: str, **kwargs):
            super().__init__(bash_command="false", append_env=True, **kwargs)
            self.stage = stage

        def execute(self, context):
            params = context["params"]
            limits = stage_limits_or_skip(params, self.stage, log=self.log)
            self.cwd = f"{RESULTS_DIR}/{run_name(params)}"
            Path(self.cwd).mkdir(parents=True, exist_ok=True)
            command = stage_command(params, self.stage, DATA_DIR, RESULTS_DIR, LOCAL_MODELS_DIR, limits["cpus"],
                                    os.environ.get("HELIXFLOW_PROFILES_DIR"))
            self.env = local_stage_environment(params)
            self.bash_command = shlex.join(["exec", os.environ.get("HELIXFLOW_BIN", "helixflow"), *command])
            self.log.info("helixflow stage: %s", self.bash_command)
            return super().execute(context)

    def make_stage(stage: str):
        return HelixflowLocalStageOperator(task_id=stage, stage=stage, trigger_rule="none_failed",
                                           pool=GPU_POOL if stage in GPU_STAGES else "default_pool")


with DAG(
    dag_id="helixflow",
    description="Geneformer or scGPT embeddings of an .h5ad dataset with the helixflow workflow",
    schedule=os.environ.get("HELIXFLOW_SCHEDULE") or None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=int(os.environ.get("HELIXFLOW_MAX_ACTIVE_RUNS", "2")),
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["helixflow", "geneformer", "scgpt"],
    doc_md=__doc__,
) as helixflow_dag:

    @task(retries=0)
    def plan(params=None) -> dict:
        """Check the params, profile and settings up front; return the stages that will run."""
        read_profile(params["model"])
        run_name(params)
        slurm_mounts(params)
        input_path(params, DATA_DIR)
        if params.get("annotate"):
            input_path(params, DATA_DIR, "annotate")
        if is_s3_url(params["input"]):
            results_url(params)
        return {stage: stage_skip_reason(params, stage) or "selected" for stage in STAGES}

    def finetune_summary(params: dict, out: Path) -> dict:
        """Held-out scores of the fine-tuned model and the linear probe (evaluate/metrics.json), or why none."""
        reason = label_skip_reason(params)
        metrics = read_results_json(params, "evaluate/metrics.json")
        if reason or metrics is None:
            return {"skipped": reason or "not evaluated (stage evaluate not selected or not finished)"}
        return {"label_column": metrics["label_column"], "classes": metrics["classes"],
                "train_cells": metrics["train_cells"], "validation_cells": metrics["validation_cells"],
                "heldout_accuracy": metrics["fine_tuned"]["accuracy"], "heldout_macro_f1": metrics["fine_tuned"]["macro_f1"],
                "probe_accuracy": metrics["linear_probe"]["accuracy"], "probe_macro_f1": metrics["linear_probe"]["macro_f1"],
                "chance_accuracy": metrics["chance_accuracy"], "mlflow_run_id": metrics["model"]["mlflow_run_id"],
                "model": str(out / "finetune" / "model"), "metrics_file": str(out / "evaluate" / "metrics.json")}

    @task(trigger_rule="none_failed")
    def upload(params=None) -> str:
        """The results of an s3:// input to HELIXFLOW_S3_RESULTS/<run name>/, the manifest _SUCCESS last."""
        from helixflow.object_storage import upload_results

        if not is_s3_url(params["input"]):
            raise AirflowSkipException("local input: the results stay in the results folder only")
        url = results_url(params)
        manifest = upload_results(Path(RESULTS_DIR) / run_name(params), url, skip=NOT_RESULTS)
        log.info("uploaded %d files to %s (manifest last: _SUCCESS)", len(manifest["files"]), url)
        return url

    @task(trigger_rule="none_failed", retries=0)
    def summary(params=None) -> dict:
        """Cells, metrics and output paths of the run, read from its results folder."""
        out = Path(RESULTS_DIR) / run_name(params)
        check = read_results_json(params, "qc/input_check.json") or {}
        outputs = {key: str(out / relative) for key, relative in {
            "embeddings": "embeddings/embeddings.h5ad", "report": "report.html", "input_check": "qc/input_check.json",
            "embedding_map": "report/embedding_map.png", "trace": "pipeline_info/execution_trace.tsv",
            "model": "finetune/model", "evaluation": "evaluate/metrics.json",
            "annotated": f"annotate/{Path(params.get('annotate') or 'none').stem}.h5ad"}.items()
            if (out / relative).exists()}
        return {"input": params["input"], "model": params["model"], "results": str(out),
                "results_url": results_url(params) if is_s3_url(params["input"]) else None,
                "cells": check.get("cells"), "genes": check.get("genes"), "input_check": check,
                "metrics": read_results_json(params, "report/embedding_summary.json"), "finetune": finetune_summary(params, out),
                "outputs": outputs}

    previous = plan()
    for stage_name in STAGES:
        current = make_stage(stage_name)
        previous >> current
        previous = current
    previous >> upload() >> summary()


with DAG(
    dag_id="helixflow_inbox",
    description="Starts a helixflow run for every new .h5ad file in the watched folder",
    schedule=os.environ.get("HELIXFLOW_INBOX_SCHEDULE", "*/5 * * * *"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["helixflow"],
) as inbox_dag:
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    @task
    def new_files(ti=None) -> list[dict]:
        """Complete .h5ad files under the watched folder whose current version has no run yet (helixflow_inbox.py)."""
        import helixflow_inbox as inbox

        watched = Path(os.environ.get("HELIXFLOW_INBOX_DIR", DATA_DIR))
        if not watched.resolve().is_relative_to(Path(DATA_DIR).resolve()):
            raise ValueError(f"HELIXFLOW_INBOX_DIR {watched} must be inside HELIXFLOW_DATA_DIR {DATA_DIR}: "
                             "the stage containers see only the data folder")
        state_dir = Path(RESULTS_DIR) / ".helixflow-inbox"
        runs, state = inbox.poll(inbox.scan(watched), inbox.read_state(state_dir), inbox.run_status_of(ti, helixflow_dag.dag_id),
                                 require_done_marker=os.environ.get("HELIXFLOW_INBOX_REQUIRE_DONE", "").lower()
                                 in ("1", "true", "yes"))
        inbox.write_state(state_dir, state)
        model = os.environ.get("HELIXFLOW_DEFAULT_MODEL", "tiny")
        prefix = watched.resolve().relative_to(Path(DATA_DIR).resolve())
        return [{"trigger_run_id": run["run_id"],
                 "conf": {"input": (prefix / run["relative"]).as_posix(), "model": model, "run_name": run["run_name"]}}
                for run in runs]

    # The run ids are fixed by the files (helixflow_inbox.run_id): a run that exists is not started twice.
    TriggerDagRunOperator.partial(task_id="start_run", trigger_dag_id=helixflow_dag.dag_id,
                                  skip_when_already_exists=True).expand_kwargs(new_files())
