# Run-wide values computed once at parse time: the model profile, the chunks, the paths.
import logging
import os
import sys
import time
from pathlib import Path

from helixflow.h5ad import chunk_bounds, inspect_h5ad, obs_has_column
from helixflow.log_output import show_logs_of
from helixflow.metrics import push_workflow
from helixflow.families import load_family
from helixflow.profiles import load_profile, step_resources, uses_gpu
from helixflow.provenance import step_fingerprint
from helixflow.steps import STEPS

# helixflow's warnings in snakemake's output (e.g. a failed metrics push) read as in a step's log.
show_logs_of("helixflow", level=logging.WARNING)

OUTDIR = config["outdir"].rstrip("/")
PROFILE = load_profile(config["model"], config["profiles_dir"])
MODEL_FILES = load_family(PROFILE["model_name"]).model_files(
    f"{config['models_dir']}/{PROFILE['name']}", PROFILE["model_name"]
)
MODEL_READY = str(MODEL_FILES.ready_file)
# A model staged before the run (`helixflow model stage`, an earlier run, a read-only mount)
# is a plain input: stage_model exists only to stage a missing one.
MODEL_STAGED = os.path.isfile(MODEL_READY)
# Reads only the file's header: a bad input fails here, before any output exists.
# (With counts_source auto, validate_input chooses the source; every source has obs's cells.)
LAYOUT = inspect_h5ad(config["input"], counts=config["counts_source"])
CHUNK_BOUNDS = {
    f"chunk-{index:05d}": bounds
    for index, bounds in enumerate(chunk_bounds(LAYOUT.n_cells, config["chunk_size"]))
}
CHUNKS = list(CHUNK_BOUNDS)
# Unlabelled data is a normal run: without the label column, embeddings and the map only.
LABELLED = bool(config["label_column"]) and obs_has_column(
    config["input"], config["label_column"]
)
FINETUNE = bool(config["finetune"]["enabled"] and LABELLED)
if config["finetune"]["enabled"] and config["label_column"] and not LABELLED:
    print(
        f"helixflow: obs of {config['input']} has no column '{config['label_column']}': "
        "fine-tuning skipped (set label_column to fine-tune on another column)",
        file=sys.stderr,
    )
ANNOTATE_INPUT = config["annotate"]["input"]
if ANNOTATE_INPUT and not FINETUNE:
    raise ValueError(
        "annotate.input needs a fine-tuned model: set finetune.enabled and label_column"
    )
# What fine-tuning adds to the run's targets (the report's trace waits for them too).
FINETUNE_TARGETS = ([f"{OUTDIR}/evaluate/metrics.json"] if FINETUNE else []) + (
    [f"{OUTDIR}/annotate/{Path(ANNOTATE_INPUT).stem}.h5ad"] if ANNOTATE_INPUT else []
)
# What every job's metrics are labelled with and where they go (helixflow.metrics). Jobs inherit
# this environment, locally and in SLURM jobs (which parse this file again). Without
# monitoring.pushgateway, an HELIXFLOW_PUSHGATEWAY already in the environment applies.
RUN_NAME = Path(OUTDIR).name
STEP_METRICS_DIR = f"{OUTDIR}/pipeline_info/steps"
os.environ.update(
    HELIXFLOW_RUN=RUN_NAME,
    HELIXFLOW_MODEL=PROFILE["name"],
    HELIXFLOW_METRICS_DIR=os.path.abspath(STEP_METRICS_DIR),
)
if config["monitoring"]["pushgateway"]:
    os.environ.update(HELIXFLOW_PUSHGATEWAY=config["monitoring"]["pushgateway"])
WORKFLOW_STARTED = time.time()


def push_workflow_metrics(success):
    """Duration, outcome and cells of this snakemake invocation (its onsuccess/onerror)."""
    push_workflow(RUN_NAME, PROFILE["name"], WORKFLOW_STARTED, LAYOUT.n_cells, success)


MODEL_ARGS = f"--models-dir {config['models_dir']} --profile {PROFILE['name']}" + (
    f" --profiles-dir {config['profiles_dir']}" if config["profiles_dir"] else ""
)
GENE_ARGS = f"--gene-id-column {config['gene_id_column']}" + (
    f" --gene-symbol-map {config['gene_symbol_map']}"
    if config["gene_symbol_map"]
    else ""
)


wildcard_constraints:
    chunk=r"chunk-\d{5}",


# A SLURM workflow profile names its GPU partition as default-resources: slurm_gpu_partition
# (its raw text: a partition name); GPU steps go there, the others to its slurm_partition.
DEFAULT_RESOURCES = workflow.resource_settings.default_resources
GPU_PARTITION = (
    DEFAULT_RESOURCES.get("slurm_gpu_partition").raw if DEFAULT_RESOURCES else None
)


def resources_of(step, dataset_cells=LAYOUT.n_cells):
    """Snakemake resources of a step (its threads: threads_of), from the model profile.

    The step's entry in helixflow.steps says what it is sized by: a chunk, or ``dataset_cells``.
    mem_mb and runtime grow with the attempt: the profile's values first, twice those on the
    first retry (--retries, e.g. after an out-of-memory kill or a SLURM time limit), and so on.
    """
    cells = dataset_cells if STEPS[step].sized_by == "dataset" else config["chunk_size"]
    resources = step_resources(PROFILE, step, min(cells, dataset_cells))
    del resources["threads"]
    resources["mem_mb"] = memory_by_attempt(resources["mem_mb"])
    resources["runtime"] = by_attempt(resources["runtime"])
    if GPU_PARTITION and uses_gpu(PROFILE, step):
        resources["slurm_partition"] = GPU_PARTITION
    return resources


def threads_of(step):
    """Snakemake threads of a step, from the model profile."""
    return step_resources(PROFILE, step)["threads"]


def container_of(step):
    """The image a step runs in: the GPU one for a GPU step of a profile with GPUs."""
    return config["containers"]["gpu" if uses_gpu(PROFILE, step) else "cpu"]


# --resources mem_mb (helixflow run: this machine's memory): local jobs run side by side within
# it, and no job asks for more than there is (it then runs alone). None on a cluster.
LOCAL_MEMORY_MB = getattr(
    workflow.resource_settings.resources.get("mem_mb"), "value", None
)


def memory_by_attempt(mem_mb):
    if LOCAL_MEMORY_MB is None:
        return by_attempt(mem_mb)
    return lambda wildcards, attempt: min(mem_mb * attempt, LOCAL_MEMORY_MB)


def by_attempt(value):
    return lambda wildcards, attempt: value * attempt


def provenance_of(step):
    """A params value naming the versions and model checksums that ``step``'s results depend on.

    Snakemake reruns a job whose params changed: new software or model files redo the affected
    steps. Evaluated when the job is scheduled, so a model staged by this run counts.
    """
    return lambda wildcards: step_fingerprint(step, MODEL_FILES)
