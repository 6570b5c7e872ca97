"""The ``helixflow`` command line: the front door over the Snakemake workflow, and each step."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from helixflow.errors import HelixflowError
from helixflow.object_storage import DEFAULT_CACHE_DIR, DEFAULT_CACHE_MAX_GB, is_s3_url, path_or_s3_url
from helixflow.profiles import PROJECT_DIR
from helixflow.run_lock import LOCK_ENV, RunLock, clear_stale_snakemake_locks
from helixflow.step_logs import report_failed_step
from helixflow.steps import FINAL_STAGE, stages, until_rules

SNAKEFILE = PROJECT_DIR / "workflow" / "Snakefile"
DEFAULT_CONFIG = PROJECT_DIR / "config" / "config.yaml"
WORKFLOW_PROFILES = sorted(p.name for p in (PROJECT_DIR / "workflow" / "profiles").iterdir() if p.is_dir())
# SIGTERM/SIGINT of `helixflow run`: how long snakemake gets to end its jobs before all are killed.
STOP_TIMEOUT_S = 30.0
STOP_SIGNALS = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}
# --until STAGE: the last rule of each user-facing stage.
UNTIL_RULES = until_rules()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after a bare '--' goes to snakemake untouched.
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.snakemake_args = passthrough
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        if getattr(args, "metrics_step", None):
            return _run_measured_step(args)
        return args.handler(args) or 0
    except HelixflowError as error:
        print(f"helixflow: error: {error.path}: {error.problem}", file=sys.stderr)
        return error.exit_code


def _run_measured_step(args) -> int:
    """A workflow step: its handler returns the cells it processed; helixflow.metrics reports the rest."""
    from helixflow.metrics import step_metrics

    logging.basicConfig(level=logging.INFO, format="helixflow: %(message)s", stream=sys.stderr)  # the step's log
    # SIGTERM (a stopped run) ends the step like an error: atomic outputs remove their partial files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with step_metrics(args.metrics_step, getattr(args, "chunk_name", None) or "all") as record:
        record.cells = args.handler(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helixflow",
        description="Run Geneformer or scGPT (through helical) over .h5ad datasets of any size as a Snakemake workflow.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    run = commands.add_parser("run", help="run the workflow on a dataset", description=(
        "Run validate -> split -> tokenize -> embed (-> fine-tune -> evaluate) -> report on INPUT with snakemake. Reruns resume: "
        "finished jobs are kept, interrupted ones are redone. Options after a bare '--' go to snakemake "
        "as they are, e.g. '-- --executor slurm --jobs 50'."))
    run.add_argument("input", type=path_or_s3_url, help="the .h5ad dataset (raw counts, never modified), or s3://BUCKET/KEY")
    run.add_argument("--model", default="tiny", help="model resource profile (see 'helixflow profile list'); default: tiny")
    run.add_argument("--out", type=path_or_s3_url, default=Path("results/run"),
                     help="output folder, or s3://BUCKET/PREFIX to upload the results to; default: results/run")
    run.add_argument("--until", choices=stages(), default=FINAL_STAGE,
                     help="last step to run; default: report (everything)")
    run.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores snakemake may use; default: all")
    run.add_argument("--chunk-size", type=int, help="cells per chunk (one job each); default from the config")
    run.add_argument("--models-dir", type=Path, help="where staged model files live; default from the config")
    run.add_argument("--profiles-dir", type=Path, help="folder of model profiles; default: the built-in ones")
    run.add_argument("--counts-source", help="where raw counts are: X, raw (.raw) or layers/NAME; default: auto "
                     "(X, or a layer or .raw holding integer counts when X is normalised)")
    run.add_argument("--gene-id-column", help="var column with Ensembl ids or gene symbols, or 'index' for var_names; "
                     "default: auto (ensembl_id, var_names, gene_ids, feature_id, gene_id, then symbol columns)")
    run.add_argument("--gene-symbol-map", type=Path, help="two-column table mapping gene symbols to Ensembl ids "
                     "(applied before the model's own ensembl_mapping_dict.pkl)")
    run.add_argument("--allow-any-values", action="store_true",
                     help="rank negative or non-integer values as they are (NaN and infinite values are refused anyway)")
    run.add_argument("--label-column", help="obs column to colour the embedding map by and fine-tune on; default: cell_type")
    run.add_argument("--annotate", type=Path, help="another .h5ad to label with the fine-tuned model")
    run.add_argument("--configfile", type=Path, default=DEFAULT_CONFIG, help="base config file; default: the built-in one")
    run.add_argument("--workflow-profile", default="default", choices=WORKFLOW_PROFILES,
                     help="where jobs run: default (this machine) or a SLURM profile of workflow/profiles (docs/hpc.md)")
    run.add_argument("--no-finetune", action="store_true",
                     help="embeddings and report only: no label split, fine-tuning or evaluation")
    run.add_argument("--dry-run", action="store_true", help="show the jobs without running them")
    # Resuming, stopping and local resources (helixflow.run_lock, helixflow.local_resources).
    run.add_argument("--memory", type=int, metavar="MB",
                     help="memory (MB) the jobs may use at once; default with the default workflow profile: "
                          "this machine's (or its container's) memory less 1024 MB for snakemake")
    run.add_argument("--stop-timeout", type=float, default=STOP_TIMEOUT_S, metavar="SECONDS",
                     help="after SIGTERM or Ctrl-C, how long running jobs get to end before they are killed; "
                          f"default: {STOP_TIMEOUT_S:.0f}")
    # Object storage (helixflow.object_storage): an s3:// input is staged into a local cache; results go up after the run.
    run.add_argument("--s3-cache", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR", help=f"cache of staged s3:// inputs; default: {DEFAULT_CACHE_DIR}")
    run.add_argument("--s3-cache-max-gb", type=float, default=DEFAULT_CACHE_MAX_GB, metavar="GB",
                     help=f"size limit of --s3-cache (least recently used inputs go first); default: {DEFAULT_CACHE_MAX_GB:g}")
    run.add_argument("--s3-work-dir", type=Path, metavar="DIR", help="local folder the run writes before its results are uploaded "
                     "to an s3:// --out; default: results/s3/BUCKET/PREFIX")
    run.set_defaults(handler=cmd_run)

    info = commands.add_parser("info", help="versions, device and model metadata", description=(
        "Print versions, the compute device and, for a staged model, its metadata as loaded by helical."))
    info.add_argument("--profile", default="tiny", help="model profile; default: tiny")
    info.add_argument("--models-dir", type=Path, default=Path("resources/models"))
    info.add_argument("--profiles-dir", type=Path)
    info.set_defaults(handler=cmd_info)

    model = commands.add_parser("model", help="stage model files").add_subparsers(metavar="ACTION")
    stage = model.add_parser("stage", help="put a model's files into helical's cache layout", description=(
        "Stage a model under MODELS_DIR/PROFILE in helical's cache layout, once; loading never uses the "
        "network afterwards. The source defaults to the profile's 'source' setting."))
    stage.add_argument("--profile", required=True, help="model profile whose model to stage")
    stage.add_argument("--models-dir", type=Path, default=Path("resources/models"))
    stage.add_argument("--profiles-dir", type=Path)
    source = stage.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="a small random model and synthetic vocabulary (demo, tests)")
    source.add_argument("--architecture", help="random weights with a real architecture, e.g. gf-6L-10M-i2048, or scGPT's real (benchmarks)")
    source.add_argument("--from", dest="from_path", type=Path, help="a folder or archive laid out like geneformer/<version>/, or scGPT's scGPT_CP folder")
    source.add_argument("--download", action="store_true", help="download from --base-url, verifying checksums")
    stage.add_argument("--base-url", help="download location; default: helical's bucket")
    stage.add_argument("--sha256", type=Path, help="JSON manifest {relative path: sha256} for --download")
    stage.add_argument("--seed", type=int, default=0, help="seed of random weights")
    stage.set_defaults(handler=cmd_model_stage)

    profile = commands.add_parser("profile", help="model resource profiles").add_subparsers(metavar="ACTION")
    show = profile.add_parser("show", help="print a profile with defaults and the resources it gives each step")
    show.add_argument("name")
    show.add_argument("--profiles-dir", type=Path)
    show.add_argument("--cells", type=int, default=10_000, help="chunk size the per-chunk steps' resources are computed for")
    show.add_argument("--dataset-cells", type=int, default=1_000_000,
                      help="dataset size the whole-dataset steps' runtime and memory are computed for; default: 1,000,000")
    show.set_defaults(handler=cmd_profile_show)
    listing = profile.add_parser("list", help="list profiles")
    listing.add_argument("--profiles-dir", type=Path)
    listing.set_defaults(handler=cmd_profile_list)

    annotate = commands.add_parser("annotate", help="predict cell types of a dataset with a fine-tuned model", description=(
        "Tokenize and classify INPUT block by block with a model written by the finetune step; write OUT (.h5ad) with "
        "INPUT's obs plus predicted_<label> and prediction_probability. INPUT is never modified."))
    annotate.add_argument("input", type=Path, help="the .h5ad dataset (raw counts)")
    annotate.add_argument("--model-dir", type=Path, required=True, help="a fine-tuned model folder (e.g. results/run/finetune/model)")
    annotate.add_argument("--out", type=Path, required=True, help="output .h5ad")
    _add_inference_args(annotate)
    _add_gene_args(annotate)
    annotate.set_defaults(handler=cmd_annotate, metrics_step="annotate")

    demo = commands.add_parser("demo-data", help="write a synthetic raw-count dataset", description=(
        "Write a realistic synthetic dataset: raw integer counts (CSR), several cell types with their own "
        "expression programs, Ensembl ids in var, cell type in obs."))
    demo.add_argument("out", type=Path)
    demo.add_argument("--cells", type=int, default=2_000)
    demo.add_argument("--genes", type=int, default=1_600, help="genes from the synthetic vocabulary")
    demo.add_argument("--mean-counts", type=float, default=3_000.0, help="median UMIs per cell")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo_data)

    _add_step_parsers(commands)
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--profiles-dir", type=Path)


def _add_gene_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gene-id-column", default="auto", help="var column with gene ids or symbols, 'index' or 'auto'")
    parser.add_argument("--gene-symbol-map", type=Path, help="two-column table: gene symbol, Ensembl id")


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda; default: auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int)


def _add_chunk_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-name", help="the chunk's name, the chunk label of the step's metrics")


def _add_step_parsers(commands) -> None:
    steps = commands.add_parser("step", help="run one workflow step (what the workflow's rules call)").add_subparsers(metavar="STEP")

    validate = steps.add_parser("validate", help="check a dataset against a model; write a JSON summary")
    validate.add_argument("input", type=Path)
    validate.add_argument("out", type=Path)
    _add_model_args(validate)
    _add_gene_args(validate)
    raw = validate.add_mutually_exclusive_group()
    raw.add_argument("--require-raw-counts", dest="raw", action="store_true", default=True)
    raw.add_argument("--allow-any-values", dest="raw", action="store_false")
    validate.add_argument("--counts-source", default="auto", help="X, raw, layers/NAME or auto")
    validate.add_argument("--label-column", help="obs column of labels (its presence is reported)")
    validate.set_defaults(handler=cmd_step_validate, metrics_step="validate_input")

    split = steps.add_parser("split", help="write cells START:STOP of a dataset to a chunk file")
    split.add_argument("input", type=Path)
    split.add_argument("out", type=Path)
    split.add_argument("--start", type=int, required=True)
    split.add_argument("--stop", type=int, required=True)
    split.add_argument("--input-check", type=Path, help="the validate step's summary: counts are read from its counts_source")
    _add_chunk_arg(split)
    split.set_defaults(handler=cmd_step_split, metrics_step="split")

    tokenize = steps.add_parser("tokenize", help="tokenize a chunk into an Arrow file, as the profile's model family does")
    tokenize.add_argument("chunk", type=Path)
    tokenize.add_argument("out", type=Path)
    _add_model_args(tokenize)
    _add_gene_args(tokenize)
    tokenize.add_argument("--threads", type=int, default=1, help="threads that rank cells in parallel")
    _add_chunk_arg(tokenize)
    tokenize.set_defaults(handler=cmd_step_tokenize, metrics_step="tokenize")

    embed = steps.add_parser("embed", help="embed a tokenized chunk")
    embed.add_argument("tokens", type=Path)
    embed.add_argument("chunk", type=Path)
    embed.add_argument("out", type=Path)
    _add_model_args(embed)
    embed.add_argument("--threads", type=int)
    embed.add_argument("--batch-size", type=int, help="default from the profile")
    _add_chunk_arg(embed)
    embed.set_defaults(handler=cmd_step_embed, metrics_step="embed")

    gather = steps.add_parser("gather", help="concatenate embedded chunks into one .h5ad")
    gather.add_argument("out", type=Path)
    gather.add_argument("chunks", type=Path, nargs="+")
    gather.add_argument("--model", required=True)
    gather.set_defaults(handler=cmd_step_gather, metrics_step="gather")

    plot = steps.add_parser("plot", help="UMAP of the embeddings")
    plot.add_argument("embeddings", type=Path)
    plot.add_argument("out_png", type=Path)
    plot.add_argument("out_json", type=Path)
    plot.add_argument("--label")
    plot.add_argument("--max-cells", type=int, default=20_000)
    plot.set_defaults(handler=cmd_step_plot, metrics_step="plot_embeddings")

    label_split = steps.add_parser("label-split", help="split labelled cells into train and validation, stratified by label")
    label_split.add_argument("out", type=Path)
    label_split.add_argument("--chunks", type=Path, nargs="+", required=True, help="chunk .h5ad files (obs holds the labels)")
    label_split.add_argument("--tokens", type=Path, nargs="+", required=True, help="their tokenized chunks, in the same order")
    label_split.add_argument("--label", required=True, help="obs column to predict")
    label_split.add_argument("--validation-fraction", type=float, default=0.2)
    label_split.add_argument("--seed", type=int, default=0)
    label_split.set_defaults(handler=cmd_step_label_split, metrics_step="label_split")

    finetune = steps.add_parser("finetune", help="fine-tune a cell classifier with DeepSpeed (resumes from checkpoints)")
    finetune.add_argument("split", type=Path, help="the label-split table")
    finetune.add_argument("out_model", type=Path, help="model folder to write")
    finetune.add_argument("out_log", type=Path, help="training log (TSV) to write")
    finetune.add_argument("--tokens", type=Path, nargs="+", required=True)
    finetune.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder (kept until the model is saved)")
    _add_model_args(finetune)
    finetune.add_argument("--label", default="cell_type", help="name of the predicted obs column, recorded with the model")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--mlflow-uri", default="mlruns", help="MLflow tracking URI, or a folder for a local store")
    finetune.add_argument("--mlflow-experiment", default="helixflow")
    finetune.add_argument("--threads", type=int)
    finetune.set_defaults(handler=cmd_step_finetune, metrics_step="finetune")

    evaluate = steps.add_parser("evaluate", help="score the fine-tuned model and a linear probe on held-out cells")
    evaluate.add_argument("model_dir", type=Path)
    evaluate.add_argument("split", type=Path, help="the label-split table")
    evaluate.add_argument("out_dir", type=Path, help="folder for metrics.json, tables and plots")
    evaluate.add_argument("--tokens", type=Path, nargs="+", required=True)
    evaluate.add_argument("--embeddings", type=Path, required=True, help="frozen-model embeddings (the gather step's output)")
    evaluate.add_argument("--training-log", type=Path, required=True)
    _add_inference_args(evaluate)
    evaluate.set_defaults(handler=cmd_step_evaluate, metrics_step="evaluate")

    versions = steps.add_parser("software-versions", help="write pipeline_info/software_versions.yml")
    versions.add_argument("out", type=Path)
    versions.add_argument("--embeddings", type=Path, required=True, help="the gathered embeddings (their provenance record)")
    versions.add_argument("--workflow-versions", required=True, help="'name=version ...' of the workflow's own process")
    versions.set_defaults(handler=cmd_step_software_versions)

    trace = steps.add_parser("trace", help="per-job execution trace from benchmark files")
    trace.add_argument("benchmarks", type=Path)
    trace.add_argument("out_tsv", type=Path)
    trace.add_argument("out_png", type=Path)
    trace.add_argument("--step-metrics", type=Path, required=True, help="the steps' metrics records (HELIXFLOW_METRICS_DIR)")
    trace.set_defaults(handler=cmd_step_trace, metrics_step="pipeline_info")


def _model_files(args):
    """The profile named by ``--profile``, and its model's staged files."""
    from helixflow.profiles import load_profile

    profile = load_profile(args.profile, args.profiles_dir)
    return profile, _staged_files(profile, args.models_dir)


def _staged_files(profile: dict, models_dir: Path):
    """Where a profile's model is staged under ``models_dir``: its family's model files."""
    from helixflow.families import load_family

    return load_family(profile["model_name"]).model_files(Path(models_dir) / profile["name"], profile["model_name"])


def _symbol_map(args):
    from helixflow.tokenization import read_symbol_map

    return read_symbol_map(args.gene_symbol_map) if args.gene_symbol_map else None


def cmd_run(args) -> int:
    from helixflow.h5ad import inspect_h5ad
    from helixflow.local_resources import jobs_memory_mb
    from helixflow.profiles import load_profile

    if is_s3_url(args.input) or is_s3_url(args.out):
        return _run_on_object_storage(args)
    # Check what snakemake would otherwise report inside a traceback.
    layout = inspect_h5ad(args.input, args.counts_source or "auto")
    if args.until == "annotate" and not args.annotate:
        raise HelixflowError(args.input, "--until annotate needs --annotate DATASET (the .h5ad to label)")
    profile = load_profile(args.model, args.profiles_dir)
    if args.until == "stage" and _is_staged(profile, args.models_dir, args.configfile):
        # The workflow has no stage_model job for a staged model: nothing to do.
        print(f"helixflow: model of profile {args.model} is already staged", file=sys.stderr)
        return 0
    overrides = {"input": args.input, "outdir": args.out, "model": args.model, "chunk_size": args.chunk_size,
                 "models_dir": args.models_dir, "profiles_dir": args.profiles_dir, "gene_id_column": args.gene_id_column,
                 "gene_symbol_map": args.gene_symbol_map, "label_column": args.label_column,
                 "counts_source": args.counts_source, "require_raw_counts": False if args.allow_any_values else None}
    config = [f"{key}={value}" for key, value in overrides.items() if value is not None]
    if args.annotate:
        inspect_h5ad(args.annotate)
        config.append(f"annotate={{input: {args.annotate}}}")
    # This interpreter's snakemake, and its bin folder first on PATH for the jobs' `helixflow`
    # commands: works from an unactivated virtual environment too.
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", os.getcwd(), "--configfile", str(args.configfile),
               "--workflow-profile", str(PROJECT_DIR / "workflow" / "profiles" / args.workflow_profile),
               "--cores", str(args.cores), "--rerun-incomplete", "--show-failed-logs", "--config", *config]
    # Local jobs run side by side only as far as the memory allows (each asks its profile's mem_mb);
    # on a cluster each job gets its own memory from the scheduler instead.
    memory_mb = args.memory or (jobs_memory_mb() if args.workflow_profile == "default" else None)
    if memory_mb:
        command[command.index("--config"):command.index("--config")] = ["--resources", f"mem_mb={memory_mb}"]
    if args.no_finetune:
        # --config cannot set a nested boolean; a second config file (merged over the first) can.
        override = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="helixflow-config-", delete=False)
        override.write("finetune:\n  enabled: false\n")
        override.close()
        command[command.index("--configfile") + 1 : command.index("--configfile") + 2] = [str(args.configfile), override.name]
    if args.until != FINAL_STAGE:
        command += ["--until", UNTIL_RULES[args.until]]
    if args.dry_run:
        command.append("--dry-run")
    command += args.snakemake_args
    print(f"helixflow: {layout.n_cells:,} cells x {layout.n_genes:,} genes, profile {args.model}"
          + (f", jobs' memory {memory_mb:,} MB" if memory_mb else ""), file=sys.stderr)
    print("helixflow: " + shlex.join(command), file=sys.stderr)
    try:
        if args.dry_run:  # snakemake itself takes no lock for a dry run, and it writes nothing
            return _run_snakemake(command, config, args, environment_path=Path(sys.executable).parent)
        with RunLock(args.out, shlex.join(["helixflow", *sys.argv[1:]])) as lock:
            if lock.interrupted:
                print(f"helixflow: resuming an interrupted run of this folder ({lock.interrupted.describe()})", file=sys.stderr)
            for stale in clear_stale_snakemake_locks(os.getcwd(), args.out):
                print(f"helixflow: removed snakemake's lock {stale}, left by a killed run", file=sys.stderr)
            return _run_snakemake(command, config, args, environment_path=Path(sys.executable).parent, lock=lock)
    finally:
        if args.no_finetune:
            os.unlink(override.name)


def _run_on_object_storage(args) -> int:
    """``helixflow run`` with an s3:// input or --out: the workflow runs on local copies, then the results go up."""
    from helixflow.object_storage import parse_s3_url, stage_input, upload_results
    from helixflow.run_lock import LOCK_NAME

    storage_log = logging.getLogger("helixflow.object_storage")  # cache hits, downloads, verification
    storage_log.setLevel(logging.INFO)
    if not storage_log.handlers:
        storage_log.addHandler(logging.StreamHandler())
        storage_log.handlers[0].setFormatter(logging.Formatter("helixflow: %(message)s"))
    results_url = str(args.out) if is_s3_url(args.out) else None
    if results_url:
        address = parse_s3_url(results_url)
        args.out = args.s3_work_dir or Path("results", "s3", address.bucket, address.key)
    with contextlib.ExitStack() as staged:
        if is_s3_url(args.input):
            args.input = staged.enter_context(stage_input(args.input, args.s3_cache,
                                                          max_cache_bytes=int(args.s3_cache_max_gb * 1e9)))
        returncode = cmd_run(args)
    if returncode == 0 and results_url and not args.dry_run:
        manifest = upload_results(args.out, results_url, skip=frozenset({LOCK_NAME}))
        print(f"helixflow: uploaded {len(manifest['files'])} files to {results_url} (manifest last: _SUCCESS)", file=sys.stderr)
    return returncode


def _run_snakemake(command: list[str], config: list[str], args, environment_path: Path, lock: RunLock | None = None) -> int:
    """Run the workflow, then its HTML report; print where the results are."""
    started = time.monotonic()
    environment = dict(os.environ, PATH=os.pathsep.join([str(environment_path), os.environ.get("PATH", "")]))
    if lock is not None:
        environment[LOCK_ENV] = str(lock.path.resolve())
    returncode = _snakemake_until_done(command, environment, lock, args.stop_timeout)
    if returncode in STOP_SIGNALS:
        print(f"helixflow: stopped by {STOP_SIGNALS[returncode]}: running jobs were ended and their outputs removed; "
              f"run the same command to resume", file=sys.stderr)
        return returncode
    if returncode != 0:
        print(f"helixflow: error: the workflow failed (snakemake exit {returncode}); "
              f"see the log named above, or rerun the same command to resume", file=sys.stderr)
        report_failed_step(args.out, since=time.time() - (time.monotonic() - started))
        return returncode
    if args.dry_run:
        return 0
    report = args.out / "report.html"
    if args.until == FINAL_STAGE:
        subprocess.run([*command[: command.index("--cores")], "--config", *config, "--report", str(report)],
                       check=True, capture_output=True, env=environment)
        print(f"helixflow: report:     {report}")
    if args.until in ("embed", FINAL_STAGE):
        from helixflow.families import FAMILIES
        from helixflow.profiles import load_profile

        key = FAMILIES[load_profile(args.model, args.profiles_dir)["family"]].embedding_key
        print(f"helixflow: embeddings: {args.out / 'embeddings' / 'embeddings.h5ad'} (obsm['{key}'])")
    metrics_path = args.out / "evaluate" / "metrics.json"
    if args.until in ("evaluate", FINAL_STAGE) and metrics_path.is_file():
        for line in finetune_summary_lines(json.loads(metrics_path.read_text()), args.out / "finetune" / "model",
                                           report if args.until == FINAL_STAGE else metrics_path):
            print(f"helixflow: {line}")
    if args.annotate:
        print(f"helixflow: annotated:  {args.out / 'annotate' / (args.annotate.stem + '.h5ad')}")
    print(f"helixflow: done in {time.monotonic() - started:.0f} s; trace: {args.out / 'pipeline_info'}")
    return 0


def finetune_summary_lines(metrics: dict, model_dir: Path, details: Path) -> list[str]:
    """What a finished run says about its fine-tuned model: its scores, and whether the probe beat it.

    Parameters
    ----------
    metrics
        The evaluate step's ``metrics.json``.
    model_dir
        Where the fine-tuned model is.
    details
        Where to read more (the report, or metrics.json without one).
    """
    lines = [f"fine-tuned: {model_dir}: held-out accuracy {metrics['fine_tuned']['accuracy']:.3f}, "
             f"macro-F1 {metrics['fine_tuned']['macro_f1']:.3f} (linear probe {metrics['linear_probe']['accuracy']:.3f}, "
             f"{metrics['linear_probe']['macro_f1']:.3f})"]
    if metrics["probe_comparison"]["probe_wins"]:
        lines.append(f"{metrics['probe_comparison']['message']} (see {details})")
    return lines


def _snakemake_until_done(command: list[str], environment: dict, lock: RunLock | None, stop_timeout: float) -> int:
    """Run snakemake in its own process group; SIGTERM or SIGINT stop it and its jobs cleanly.

    On the first signal, the whole group (snakemake, its jobs' shells and steps) gets SIGTERM:
    the steps end (removing their partial files), snakemake removes the failed jobs' outputs
    and exits. Whatever still runs after ``stop_timeout`` seconds, or after a second signal,
    is killed. Returns snakemake's exit code, or 128 + the signal's number after a stop.
    """
    received: list[tuple[int, float]] = []  # (signal, when)
    process = None

    def stop(signum, frame):
        received.append((signum, time.monotonic()))
        if process is not None:
            _signal_group(process.pid, signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        process = subprocess.Popen(command, env=environment, start_new_session=True,
                                   pass_fds=(lock.fd,) if lock is not None else ())
        if received:  # a signal while it started
            _signal_group(process.pid, signal.SIGTERM)
        if lock is not None:
            lock.record_snakemake(process.pid)
        while True:
            try:
                returncode = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > stop_timeout:
                    _signal_group(process.pid, signal.SIGKILL)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        _signal_group(process.pid, signal.SIGKILL)  # no job outlives the run
        return 128 + received[0][0]
    return returncode


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the group has ended


def _is_staged(profile: dict, models_dir: Path | None, configfile: Path) -> bool:
    import yaml

    if models_dir is None:
        models_dir = Path(yaml.safe_load(configfile.read_text())["models_dir"])
    try:
        _staged_files(profile, models_dir).check()
    except HelixflowError:
        return False
    return True


def cmd_info(args) -> int:
    import torch

    def package_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = {"python": platform.python_version()}
    lines.update({name: package_version(name) for name in ("helixflow", "helical", "torch", "transformers", "snakemake", "anndata", "deepspeed")})
    lines["device"] = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    lines["cpu threads"] = str(torch.get_num_threads())
    profile, files = _model_files(args)
    lines.update({"profile": profile["name"], "model": f"{profile['model_name']} ({profile['family']})",
                  "precision": profile["precision"],
                  "profile device": profile["device"], "model files": str(files.model_dir)})
    try:
        files.check()
    except HelixflowError as missing:
        lines["model status"] = f"not staged ({missing.problem})"
    else:
        from helixflow.families import load_family

        lines.update(load_family(profile["model_name"]).describe(files, batch_size=profile["embed"]["batch_size"]))
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_model_stage(args) -> int:
    from helixflow.families import load_family

    profile, files = _model_files(args)
    source = profile["source"]
    if args.tiny:
        source = "tiny"
    elif args.architecture:
        source = f"architecture:{args.architecture}"
    elif args.from_path:
        source = f"path:{args.from_path}"
    elif args.download:
        source = "download"
    # "staged": files must already be in place (air-gapped sites copy them); the family checks them.
    load_family(profile["model_name"]).stage(files, source, seed=args.seed, sha256_manifest=args.sha256,
                                             base_url=args.base_url)
    print(f"helixflow: staged {profile['family']} model {profile['model_name']} ({source}) in {files.model_dir}")
    return 0


def cmd_profile_show(args) -> int:
    import yaml

    from helixflow.profiles import load_profile, step_resources
    from helixflow.steps import STEPS

    profile = load_profile(args.name, args.profiles_dir)
    shown = dict(profile, snakemake_resources={
        name: step_resources(profile, name, args.dataset_cells if step.sized_by == "dataset" else args.cells)
        for name, step in STEPS.items()})
    print(yaml.safe_dump(shown, sort_keys=False), end="")
    return 0


def cmd_profile_list(args) -> int:
    from helixflow.profiles import list_profiles, load_profile

    for name in list_profiles(args.profiles_dir):
        profile = load_profile(name, args.profiles_dir)
        print(f"{name:<22} {profile['model_name']:<20} {profile['device']:<5} {profile['precision']:<5} {profile['description']}")
    return 0


def cmd_demo_data(args) -> int:
    from helixflow.demo_data import make_demo_dataset

    make_demo_dataset(args.out, args.cells, n_genes=args.genes, mean_counts=args.mean_counts, seed=args.seed)
    print(f"helixflow: wrote {args.cells:,} synthetic cells to {args.out}")
    return 0


def cmd_step_validate(args) -> int:
    from helixflow.split import validate_input

    _, files = _model_files(args)
    summary = validate_input(args.input, files, args.out, args.gene_id_column, _symbol_map(args), args.raw,
                             args.counts_source, args.label_column)
    print(json.dumps(summary))
    return summary["cells"]


def cmd_step_split(args) -> int:
    from helixflow.split import split_chunk

    counts = json.loads(args.input_check.read_text())["counts_source"] if args.input_check else "X"
    split_chunk(args.input, args.out, args.start, args.stop, counts)
    print(f"helixflow: cells {args.start}:{args.stop} -> {args.out}")
    return args.stop - args.start


def cmd_step_tokenize(args) -> int:
    from helixflow.families import load_family

    profile, files = _model_files(args)
    started = time.monotonic()
    cells = load_family(profile["model_name"]).tokenize_chunk(
        args.chunk, files, args.out, gene_column=args.gene_id_column, symbol_map=_symbol_map(args),
        threads=args.threads, progress=True)
    print(f"helixflow: tokenized {cells} cells in {time.monotonic() - started:.1f} s -> {args.out}")
    return cells


def cmd_step_embed(args) -> int:
    from helixflow.families import load_family
    from helixflow.provenance import provenance

    profile, files = _model_files(args)
    started = time.monotonic()
    cells = load_family(profile["model_name"]).embed_chunk(
        args.tokens, args.chunk, files, args.out, batch_size=args.batch_size or profile["embed"]["batch_size"],
        device=profile["device"], precision=profile["precision"], threads=args.threads, progress=True,
        provenance=provenance(files, profile["name"]))
    print(f"helixflow: embedded {cells} cells in {time.monotonic() - started:.1f} s -> {args.out}")
    return cells


def cmd_step_gather(args) -> int:
    from helixflow.embedding import chunk_provenance, gather_embeddings
    from helixflow.provenance import common_provenance

    # The embed jobs' own record (the environment that computed the embeddings), one for all chunks.
    record = common_provenance([chunk_provenance(chunk) for chunk in args.chunks], args.chunks[0].parent)
    metadata = {"model_profile": args.model, "chunks": len(args.chunks), "provenance": record}
    cells = gather_embeddings(args.chunks, args.out, metadata)
    print(f"helixflow: gathered {cells} cells from {len(args.chunks)} chunks -> {args.out}")
    return cells


def cmd_step_label_split(args) -> int:
    from helixflow.label_split import write_label_split

    summary = write_label_split(args.chunks, args.tokens, args.out, args.label, args.validation_fraction, args.seed)
    table = summary.fillna({"label": "(no label)"}).pivot_table(index="label", columns="split", values="cells", aggfunc="sum", fill_value=0)
    print(table.to_string())
    return int(summary["cells"].sum())


def cmd_step_finetune(args) -> int:
    from helixflow.finetune import finetune

    profile, files = _model_files(args)
    summary = finetune(args.split, args.tokens, files, profile, args.out_model, args.out_log, args.checkpoints,
                       args.seed, args.mlflow_uri, args.mlflow_experiment, args.label, args.threads)
    print(f"helixflow: fine-tuned in {summary['seconds_this_session']} s ({summary['stop_reason']}): kept epoch "
          f"{summary['kept']['epoch']:g}, validation accuracy {summary['validation_accuracy']:.4f} -> {args.out_model} "
          f"(MLflow run {summary['mlflow_run_id']})")
    return summary["train_cells"] + summary["validation_cells"]


def cmd_step_evaluate(args) -> int:
    from helixflow.evaluate import evaluate

    metrics = evaluate(args.model_dir, args.split, args.tokens, args.embeddings, args.training_log, args.out_dir,
                       args.batch_size, args.device, args.precision, args.threads)
    print(f"helixflow: held-out accuracy {metrics['fine_tuned']['accuracy']:.4f}, macro-F1 {metrics['fine_tuned']['macro_f1']:.4f} "
          f"(linear probe {metrics['linear_probe']['accuracy']:.4f}, {metrics['linear_probe']['macro_f1']:.4f}; "
          f"chance {metrics['chance_accuracy']:.4f}) -> {args.out_dir}")
    return metrics["validation_cells"]


def cmd_annotate(args) -> int:
    from helixflow.annotate import annotate

    started = time.monotonic()
    counts, predicted = annotate(args.input, args.model_dir, args.out, args.batch_size, args.device, args.precision,
                                 args.threads, args.gene_id_column, _symbol_map(args))
    print(counts.to_string())
    cells = int(counts.sum())
    print(f"helixflow: annotated {cells:,} cells in {time.monotonic() - started:.1f} s -> {args.out} (obs['{predicted}'])")
    return cells


def cmd_step_plot(args) -> int:
    from helixflow.report import plot_embedding_map

    summary = plot_embedding_map(args.embeddings, args.out_png, args.out_json, args.label, args.max_cells)
    print(json.dumps(summary))
    return summary["cells_plotted"]


def cmd_step_software_versions(args) -> int:
    from helixflow.provenance import write_software_versions

    versions = write_software_versions(args.out, args.embeddings, args.workflow_versions)
    print(json.dumps(versions, indent=1))
    return 0


def cmd_step_trace(args) -> int:
    from helixflow.report import write_trace

    table = write_trace(args.benchmarks, args.step_metrics, args.out_tsv, args.out_png)
    print(table.to_string(index=False))
    return 0  # it reads the other jobs' records; it processes no cells


if __name__ == "__main__":
    sys.exit(main())
