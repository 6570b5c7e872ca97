"""The commands a user starts a job with: ``helixflow run`` (the Snakemake workflow over a
dataset), ``helixflow annotate`` and ``helixflow demo-data``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helixflow.cli.shared import add_gene_args, add_inference_args, staged_files, symbol_map
from helixflow.errors import HelixflowError
from helixflow.log_output import show_logs_of
from helixflow.object_storage import DEFAULT_CACHE_DIR, DEFAULT_CACHE_MAX_GB, is_s3_url, path_or_s3_url
from helixflow.run_lock import LOCK_ENV, RunLock, clear_stale_snakemake_locks
from helixflow.step_logs import failed_step_error
from helixflow.steps import FINAL_STAGE, stages, until_rules

# The Snakemake workflow is not package data: it stays in the checkout next to src/ (workflow/,
# config/config.yaml), where snakemake runs it directly too. `helixflow run` needs that checkout
# (an editable install, as the images have); every other command works from a wheel.
CHECKOUT_DIR = Path(__file__).resolve().parents[3]
SNAKEFILE = CHECKOUT_DIR / "workflow" / "Snakefile"
DEFAULT_CONFIG = CHECKOUT_DIR / "config" / "config.yaml"
WORKFLOW_PROFILES_DIR = CHECKOUT_DIR / "workflow" / "profiles"
WORKFLOW_PROFILES = (sorted(p.name for p in WORKFLOW_PROFILES_DIR.iterdir() if p.is_dir())
                     if WORKFLOW_PROFILES_DIR.is_dir() else [])  # none without the checkout: `run` says so
# SIGTERM/SIGINT of `helixflow run`: how long snakemake gets to end its jobs before all are killed.
STOP_TIMEOUT_S = 30.0
STOP_SIGNALS = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}
# --until STAGE: the last rule of each user-facing stage.
UNTIL_RULES = until_rules()


def add_run_command(commands: argparse._SubParsersAction) -> None:
    """``helixflow run``: the workflow over a dataset, resumable and stoppable."""
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


def add_annotate_command(commands: argparse._SubParsersAction) -> None:
    """``helixflow annotate``: label a dataset with a fine-tuned model."""
    annotate = commands.add_parser("annotate", help="predict cell types of a dataset with a fine-tuned model", description=(
        "Tokenize and classify INPUT block by block with a model written by the finetune step; write OUT (.h5ad) with "
        "INPUT's obs plus predicted_<label> and prediction_probability. INPUT is never modified."))
    annotate.add_argument("input", type=Path, help="the .h5ad dataset (raw counts)")
    annotate.add_argument("--model-dir", type=Path, required=True, help="a fine-tuned model folder (e.g. results/run/finetune/model)")
    annotate.add_argument("--out", type=Path, required=True, help="output .h5ad")
    add_inference_args(annotate)
    add_gene_args(annotate)
    annotate.set_defaults(handler=cmd_annotate, metrics_step="annotate")


def add_demo_data_command(commands: argparse._SubParsersAction) -> None:
    """``helixflow demo-data``: a synthetic dataset to try the workflow on."""
    demo = commands.add_parser("demo-data", help="write a synthetic raw-count dataset", description=(
        "Write a realistic synthetic dataset: raw integer counts (CSR), several cell types with their own "
        "expression programs, Ensembl ids in var, cell type in obs."))
    demo.add_argument("out", type=Path)
    demo.add_argument("--cells", type=int, default=2_000)
    demo.add_argument("--genes", type=int, default=1_600, help="genes from the synthetic vocabulary")
    demo.add_argument("--mean-counts", type=float, default=3_000.0, help="median UMIs per cell")
    demo.add_argument("--no-labels", dest="labels", action="store_false",
                      help="no cell-type column: cells to annotate, which a run embeds without fine-tuning")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=cmd_demo_data)


def cmd_run(args) -> int:
    from helixflow.h5ad import inspect_h5ad
    from helixflow.local_resources import jobs_memory_mb
    from helixflow.profiles import load_profile

    _require_workflow()
    if is_s3_url(args.input) or is_s3_url(args.out):
        return _run_on_object_storage(args)
    # Check what snakemake would otherwise report inside a traceback.
    layout = inspect_h5ad(args.input, counts=args.counts_source or "auto")
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
               "--workflow-profile", str(WORKFLOW_PROFILES_DIR / args.workflow_profile),
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


def _require_workflow() -> None:
    """Refuse ``helixflow run`` where the workflow is missing: a wheel holds the package, not workflow/."""
    if not SNAKEFILE.is_file():
        raise HelixflowError(SNAKEFILE, "no workflow: 'helixflow run' needs the Snakemake workflow of a helixflow checkout "
                                        "(workflow/, config/config.yaml); install the checkout with 'pip install -e'")


def _run_on_object_storage(args) -> int:
    """``helixflow run`` with an s3:// input or --out: the workflow runs on local copies, then the results go up."""
    from helixflow.object_storage import parse_s3_url, stage_input, upload_results
    from helixflow.run_lock import LOCK_NAME

    show_logs_of("helixflow.object_storage")  # cache hits, downloads, verification
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
        step_error = failed_step_error(args.out, since=time.time() - (time.monotonic() - started))
        if step_error:
            print(step_error, file=sys.stderr)
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
        staged_files(profile, models_dir).check()
    except HelixflowError:
        return False
    return True


def cmd_annotate(args) -> int:
    from helixflow.annotate import annotate

    started = time.monotonic()
    counts, predicted = annotate(args.input, args.model_dir, args.out, batch_size=args.batch_size, device=args.device,
                                 precision=args.precision, threads=args.threads, gene_id_column=args.gene_id_column,
                                 symbol_map=symbol_map(args))
    print(counts.to_string())
    cells = int(counts.sum())
    print(f"helixflow: annotated {cells:,} cells in {time.monotonic() - started:.1f} s -> {args.out} (obs['{predicted}'])")
    return cells


def cmd_demo_data(args) -> int:
    from helixflow.demo_data import make_demo_dataset

    make_demo_dataset(args.out, args.cells, n_genes=args.genes, mean_counts=args.mean_counts, labels=args.labels,
                      seed=args.seed)
    print(f"helixflow: wrote {args.cells:,} synthetic cells to {args.out}")
    return 0

