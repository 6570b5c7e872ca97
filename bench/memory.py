"""Peak memory of every workflow step at two dataset sizes: is it set by the chunk, not the dataset?

A shallow dataset (8 genes per cell, a string index and a cell-type column in ``obs``) is
written block by block (``helixflow.demo_data.make_sparse_dataset``), cut into chunks of
10,000 cells and run through split and tokenize in this process; the tiny model embeds the
last chunk, and the other chunks' embeddings are derived from it (see :func:`prepare`).
Then each step is run the way its workflow rule runs it (``helixflow step ...``, or
``helixflow annotate``) in a fresh interpreter, which reports its own peak RSS (VmHWM): the
per-chunk steps on the dataset's last chunk, the whole-dataset steps on all chunks.
Fine-tuning itself cannot train on millions of cells here, so its data loading is measured
(the label split read into per-cell numbers, one epoch's batch order, one batch fetched and
padded as the finetune step pads it), and evaluate scores every validation cell with an
untrained classifier saved by helixflow's own code.

    nice python bench/memory.py                      # 1M and 10M cells; rewrites docs/benchmarks.md's section
    nice python bench/memory.py --steps evaluate     # only these steps (and what they need); the others'
                                                     # figures are kept from bench/results/memory.json
    python bench/memory.py --sizes 100000 1000000    # what tests/test_memory.py checks

Ten million cells need about 17 GB of disk under --workdir; preparing them takes minutes,
measuring hours (annotate runs the model over every cell, evaluate over every validation cell).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/memory.py: begin -->", "<!-- bench/memory.py: end -->"
CHUNK_CELLS = 10_000
INFERENCE_BATCH = 512  # shallow cells: large batches keep the harness fast; memory per batch stays tiny
PEAK_PREFIX = "helixflow-peak-rss-mb="

# A measured process: the rule's own command line through helixflow's CLI, then its VmHWM.
# (VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.)
CLI = f"""
import sys
from helixflow.cli import main
code = main(sys.argv[1:])
peak = next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("{PEAK_PREFIX}" + str(peak), file=sys.stderr)
sys.exit(code)
"""
FINETUNE_LOADING = f"""
import sys
from helixflow.families import load_family
from helixflow.finetune import load_labelled_cells
from helixflow.model_files import ModelFiles
from helixflow.token_batches import EpochBatches, pad_batch
files = ModelFiles(sys.argv[1], "gf-6L-10M-i2048")
labels, cells = load_labelled_cells(sys.argv[2], sys.argv[3:])
batches = EpochBatches(cells["train"].lengths, 16, seed=0, epoch=0)
pad_batch(cells["train"].fetch(batches[0]), load_family(files.model_name).padding(files))
peak = next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("{PEAK_PREFIX}" + str(peak), file=sys.stderr)
"""
STEPS = ("validate_input", "split", "tokenize", "embed", "gather", "plot_embeddings", "label_split",
         "finetune (data loading)", "evaluate", "annotate", "pipeline_info")
STEP_NEEDS = {"plot_embeddings": ("gather",), "finetune (data loading)": ("label_split",),
              "evaluate": ("gather", "label_split"), "annotate": ("label_split",)}  # the outputs they read
RESULTS = ROOT / "bench" / "results" / "memory.json"


@dataclass(frozen=True)
class Run:
    """A dataset of ``n_cells`` with its chunks, tokens, embeddings and a classifier, under ``root``."""

    root: Path
    n_cells: int
    models_dir: Path

    @property
    def data(self) -> Path:
        return self.root / "cells.h5ad"

    @property
    def chunk_names(self) -> list[str]:
        return [f"chunk-{index:05d}" for index in range(-(-self.n_cells // CHUNK_CELLS))]

    def path(self, kind: str, chunk: str) -> Path:
        suffix = {"chunks": "h5ad", "tokens": "arrow", "embedded": "h5ad"}[kind]
        return self.root / kind / f"{chunk}.{suffix}"

    def paths(self, kind: str) -> list[str]:
        return [str(self.path(kind, chunk)) for chunk in self.chunk_names]


def prepare(root: Path, n_cells: int, models_dir: Path) -> Run:
    """Write the dataset and every chunk's split, tokens and embeddings (in this process, not measured).

    Split and tokenize run for real on every chunk (a fraction of a second each). Embedding is
    what takes time (seconds a chunk: one to two hours for ten million cells on two cores), so
    only the last chunk, the one the per-chunk steps are measured on, is embedded by the model;
    every other chunk's embeddings are derived from it (:func:`derived_embeddings`) and written
    by the embed step's own writer with the same provenance record, so the whole-dataset steps
    read files that differ from a workflow run's only in their numbers.
    """
    from helixflow.demo_data import make_sparse_dataset
    from helixflow.embedding import embed_chunk, write_embedded_chunk
    from helixflow.h5ad import chunk_bounds
    from helixflow.geneformer_models import model_facts
    from helixflow.model_files import ModelFiles
    from helixflow.provenance import provenance
    from helixflow.split import split_chunk
    from helixflow.tokenization import open_tokens, tokenize_chunk

    run = Run(root, n_cells, models_dir)
    files = ModelFiles(models_dir / "tiny", "gf-6L-10M-i2048")
    record = provenance(files, "tiny")  # what each embed job records, as gather expects
    make_sparse_dataset(run.data, n_cells, seed=n_cells)
    for chunk, (start, stop) in zip(run.chunk_names, chunk_bounds(n_cells, CHUNK_CELLS)):
        split_chunk(run.data, run.path("chunks", chunk), start, stop)
        tokenize_chunk(run.path("chunks", chunk), files, run.path("tokens", chunk))
    last = run.chunk_names[-1]
    embed_chunk(run.path("tokens", last), run.path("chunks", last), files, run.path("embedded", last),
                batch_size=INFERENCE_BATCH, device="cpu", provenance=record)
    template = read_obs_and_embeddings(run.path("embedded", last))
    special = 2 if model_facts(files.model_name)["special_tokens"] else 0  # <cls> and <eos> are no genes
    rng = np.random.default_rng(n_cells)
    for chunk in run.chunk_names[:-1]:
        obs = read_obs_and_embeddings(run.path("chunks", chunk))[0]
        lengths = open_tokens(run.path("tokens", chunk)).column("length").to_numpy()
        embeddings = derived_embeddings(template, obs["cell_type"].to_numpy(), lengths > special, rng)
        write_embedded_chunk(obs, embeddings, run.path("embedded", chunk), provenance=record)
    _write_job_benchmarks(run)
    return run


def read_obs_and_embeddings(path: Path) -> tuple[pd.DataFrame, np.ndarray | None]:
    """``obs`` of a chunk or embeddings file, and its embeddings if it has them."""
    from anndata.io import read_elem
    from helixflow.embedding import EMBEDDING_KEY

    with h5py.File(path, "r") as handle:
        embeddings = handle[f"obsm/{EMBEDDING_KEY}"][()] if f"obsm/{EMBEDDING_KEY}" in handle else None
        return read_elem(handle["obs"]), embeddings


def derived_embeddings(template: tuple[pd.DataFrame, np.ndarray], cell_types: np.ndarray, has_genes: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
    """Embeddings for cells of ``cell_types``, drawn from the model's embeddings of ``template``'s cells.

    Each cell gets the embedding of a random template cell of its type, plus noise of a
    twentieth of the embeddings' spread, so rows are distinct and cell types stay apart as the
    model keeps them; cells without a gene token get NaN, as the embed step writes them.
    """
    template_obs, template_embeddings = template
    template_types = template_obs["cell_type"].to_numpy()
    out = np.full((len(cell_types), template_embeddings.shape[1]), np.nan, dtype=np.float32)
    spread = np.nanstd(template_embeddings, axis=0).astype(np.float32)
    embedded = ~np.isnan(template_embeddings[:, 0])
    for cell_type in np.unique(cell_types):
        cells = np.flatnonzero((cell_types == cell_type) & has_genes)
        sources = np.flatnonzero((template_types == cell_type) & embedded)
        sources = sources if len(sources) else np.flatnonzero(embedded)  # a type the template chunk lacks
        picks = template_embeddings[rng.choice(sources, size=len(cells))]
        out[cells] = picks + rng.normal(0, 1, size=picks.shape).astype(np.float32) * spread / 20
    return out


def _write_job_benchmarks(run: Run) -> None:
    """Snakemake benchmark files of the per-chunk jobs, as a workflow run leaves them for pipeline_info."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rule in ("split", "tokenize", "embed"):
        folder = run.root / "benchmarks" / rule
        folder.mkdir(parents=True, exist_ok=True)
        for chunk in run.chunk_names:
            (folder / f"{chunk}.tsv").write_text(header + "1.5\t0:00:01\t250.1\t900.2\t240.0\t245.0\t3.1\t2.2\t90.0\t1.4\n")


def save_untrained_classifier(run: Run, split: Path) -> tuple[Path, Path]:
    """A classifier folder and training log as the finetune step writes them (random head, not trained)."""
    from helixflow.classifier import build_classifier, save_classifier
    from helixflow.finetune import write_training_log
    from helixflow.label_split import class_names
    from helixflow.model_files import ModelFiles
    from helixflow.tracking import resolve_tracking_uri, tracked_run

    files = ModelFiles(run.models_dir / "tiny", "gf-6L-10M-i2048")
    labels = class_names(split)
    model = build_classifier(files, labels, frozen_layers=0, seed=0)
    mlruns = run.root / "mlruns"
    with tracked_run(mlruns, experiment="memory", run_name="untrained") as tracker:
        run_id = tracker.run_id
    metadata = {"profile": "tiny", "label_column": "cell_type", "labels": labels, "seed": 0, "train_cells": 0,
                "validation_cells": 0, "optimizer_steps": 0, "precision": "fp32", "train": {}, "validation_accuracy": 0.0,
                "mlflow_tracking_uri": resolve_tracking_uri(mlruns), "mlflow_run_id": run_id}
    out = save_classifier(model.state_dict(), model.config, files, run.root / "finetune" / "model", metadata)
    log = run.root / "finetune" / "training_log.tsv"
    write_training_log([{"step": 1, "epoch": 1.0, "train_loss": 1.0, "learning_rate": 1e-4},
                        {"step": 1, "epoch": 1.0, "validation_loss": 1.0, "validation_accuracy": 0.2}], log)
    return out, log


def peak_rss_mb(code: str, argv: list[str], environment: dict) -> int:
    """Run ``code`` with ``argv`` in a fresh interpreter; return the peak RSS it reports."""
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:2]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return int(result.stderr.rsplit(PEAK_PREFIX, 1)[1].split()[0])


def measure(run: Run, plot_cells: int = 20_000, steps: tuple[str, ...] = STEPS) -> dict[str, dict]:
    """Peak RSS (MB), wall time (s) and date of ``steps`` (and the steps they need) on ``run``, each in its own process."""
    wanted = set(steps).union(*(STEP_NEEDS.get(step, ()) for step in steps))
    out = run.root / "measured"
    model = ["--models-dir", str(run.models_dir), "--profile", "tiny"]
    last = run.chunk_names[-1]
    start = (len(run.chunk_names) - 1) * CHUNK_CELLS
    split_table = out / "finetune" / "label_split.tsv"
    commands = {
        "validate_input": ["step", "validate", str(run.data), str(out / "qc" / "input_check.json"), *model],
        "split": ["step", "split", str(run.data), str(out / "chunks" / f"{last}.h5ad"), "--start", str(start),
                  "--stop", str(run.n_cells), "--chunk-name", last],
        "tokenize": ["step", "tokenize", str(run.path("chunks", last)), str(out / "tokens" / f"{last}.arrow"), *model,
                     "--chunk-name", last],
        "embed": ["step", "embed", str(run.path("tokens", last)), str(run.path("chunks", last)),
                  str(out / "embeddings" / f"{last}.h5ad"), *model, "--batch-size", str(INFERENCE_BATCH), "--chunk-name", last],
        "gather": ["step", "gather", str(out / "embeddings" / "embeddings.h5ad"), *run.paths("embedded"), "--model", "tiny"],
        "plot_embeddings": ["step", "plot", str(out / "embeddings" / "embeddings.h5ad"), str(out / "report" / "map.png"),
                            str(out / "report" / "map.json"), "--label", "cell_type", "--max-cells", str(plot_cells)],
        "label_split": ["step", "label-split", str(split_table), "--chunks", *run.paths("chunks"),
                        "--tokens", *run.paths("tokens"), "--label", "cell_type"],
    }
    environment = dict(os.environ, HELIXFLOW_METRICS_DIR=str(out / "pipeline_info" / "steps"), HELIXFLOW_RUN="memory")
    environment.pop("HELIXFLOW_PUSHGATEWAY", None)
    figures = {}

    def timed(step: str, code: str, argv: list[str]) -> None:
        if step not in wanted:
            return
        started = time.monotonic()
        figures[step] = {"peak_rss_mb": peak_rss_mb(code, argv, environment), "seconds": round(time.monotonic() - started, 1),
                         "date": time.strftime("%Y-%m-%d")}

    for step, argv in commands.items():
        timed(step, CLI, argv)
    timed("finetune (data loading)", FINETUNE_LOADING, [str(run.models_dir / "tiny"), str(split_table), *run.paths("tokens")])
    if wanted & {"evaluate", "annotate"}:
        model_dir, training_log = save_untrained_classifier(run, split_table)
        timed("evaluate", CLI, ["step", "evaluate", str(model_dir), str(split_table), str(out / "evaluate"),
                                "--tokens", *run.paths("tokens"), "--embeddings", str(out / "embeddings" / "embeddings.h5ad"),
                                "--training-log", str(training_log), "--batch-size", str(INFERENCE_BATCH), "--device", "cpu"])
        timed("annotate", CLI, ["annotate", str(run.data), "--model-dir", str(model_dir), "--out", str(out / "annotate.h5ad"),
                                "--batch-size", str(INFERENCE_BATCH), "--device", "cpu"])
    timed("pipeline_info", CLI, ["step", "trace", str(run.root / "benchmarks"), str(out / "pipeline_info" / "trace.tsv"),
                                 str(out / "pipeline_info" / "trace.png"), "--step-metrics", str(out / "pipeline_info" / "steps")])
    return figures


def markdown(results: dict[int, dict[str, dict]], command: str) -> str:
    """The generated section of docs/benchmarks.md."""
    small, large = sorted(results)
    lines = [f"Measured on {platform.machine()}, Python {platform.python_version()}, with `{command}` (chunks of "
             f"{CHUNK_CELLS:,} cells, tiny model, 8 genes per cell); the last column says when each step was measured.", "",
             f"| step | peak MB at {small:,} cells | peak MB at {large:,} cells | growth | s at {small:,} | s at {large:,} | measured |",
             "|---|---:|---:|---:|---:|---:|---|"]
    lines.append("| *preparing the data (not measured)* | | | | " + " | ".join(
        str(results[size]["prepare (not measured)"]["seconds"]) for size in (small, large)) + " | |")
    for step in STEPS:
        a, b = results[small][step], results[large][step]
        growth = 100 * (b["peak_rss_mb"] - a["peak_rss_mb"]) / a["peak_rss_mb"]
        lines.append(f"| {step} | {a['peak_rss_mb']} | {b['peak_rss_mb']} | {growth:+.0f}% | {a['seconds']} | {b['seconds']} | {b['date']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000], help="the two dataset sizes")
    parser.add_argument("--workdir", type=Path, help="where the datasets go (default: a temporary folder, removed)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), metavar="STEP",
                        help=f"the steps to measure (default: all); the others are kept from {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md or the results file")
    args = parser.parse_args()
    previous = {}
    if set(args.steps) != set(STEPS):
        previous = {int(size): figures for size, figures in json.loads(RESULTS.read_text()).items()}
        if sorted(previous) != sorted(args.sizes):
            parser.error(f"{RESULTS} holds sizes {sorted(previous)}, not {sorted(args.sizes)}: measure every step")
    from helixflow.model_files import ModelFiles, stage_synthetic

    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        root = Path(folder)
        stage_synthetic(ModelFiles(root / "models" / "tiny", "gf-6L-10M-i2048"))
        results = {}
        for n_cells in args.sizes:
            started = time.monotonic()
            run = prepare(root / f"cells-{n_cells}", n_cells, root / "models")
            prepared = round(time.monotonic() - started, 1)
            print(f"prepared {n_cells:,} cells in {prepared:.0f} s", flush=True)
            results[n_cells] = {**previous.get(n_cells, {}), "prepare (not measured)": {"seconds": prepared},
                                **measure(run, steps=tuple(args.steps))}
            print(json.dumps({n_cells: results[n_cells]}), flush=True)
    print(markdown(results, "bench/memory.py"))
    if not args.no_doc:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        command = "nice python bench/memory.py" + ("" if args.sizes == [1_000_000, 10_000_000] else f" --sizes {' '.join(map(str, args.sizes))}")
        if previous:
            command += " --steps " + " ".join(f"'{step}'" if " " in step else step for step in args.steps)
        text = DOC.read_text()
        section = f"{BEGIN}\n{markdown(results, command)}\n{END}"
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text += f"\n{section}\n"
        DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
