"""End to end on the .test configs with plain snakemake: outputs of each model family, lint, resume after loss or kill."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PROJECT_DIR, sha256
from helixflow.classifier import FineTunedModel
from helixflow.demo_data import make_demo_dataset
from helixflow.embedding import embed_tokens, load_encoder
from helixflow.model_files import ModelFiles
from helixflow.profiles import load_profile
from helixflow.scgpt import tokenization as scgpt_tokenization
from helixflow.scgpt.embedding import embed_token_table
from helixflow.scgpt.files import ScGPTFiles
from helixflow.tokenization import open_tokens, tokenize_chunk

TEST_INPUT = PROJECT_DIR / ".test" / "resources" / "test.h5ad"
OUT = PROJECT_DIR / ".test" / "results" / "test"
CONFIG = ".test/config/config.yaml"
SNAKEMAKE = ["snakemake", "--cores", "2"]
# Each family's .test run: its fixture, profile, results folder, embeddings' obsm key and width.
SCGPT_CONFIG = ".test/config/config-scgpt.yaml"
SCGPT_OUT = PROJECT_DIR / ".test" / "results" / "test-scgpt"
RUNS = {
    "geneformer": {"fixture": "finished_run", "profile": "tiny", "out": OUT, "key": "X_geneformer", "width": 128},
    "scgpt": {"fixture": "finished_scgpt_run", "profile": "scgpt-tiny", "out": SCGPT_OUT, "key": "X_scgpt", "width": 32},
}
# The resume tests below are about the chunked steps: they run up to the embeddings only, so
# fine-tuning (tested in test_finetune.py) does not run again after each damage.
EMBED_ONLY = ("--until", "gather")


def snakemake(*extra: str, check: bool = True, config: str = CONFIG) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, "--configfile", config, *extra], cwd=PROJECT_DIR, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(extra)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def planned_jobs(*extra: str) -> dict[str, int]:
    """Rule -> job count of what snakemake would run now (dry run)."""
    text = snakemake("--dry-run", "--quiet", "rules", *extra).stdout
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


def forget_outputs(folder: Path) -> None:
    """Drop the checkout's Snakemake records of earlier outputs under ``folder``, as a fresh clone has none.

    With a record but no file, Snakemake compares the job's params while it plans, before
    stage_model has run: the fingerprint then says "not staged" and is recorded so, and the next
    run redoes every step (see helixflow.provenance.step_fingerprint).
    """
    for record in (PROJECT_DIR / ".snakemake" / "metadata").glob("*"):
        name = record.name + "=" * (-len(record.name) % 4)
        if record.is_file() and base64.urlsafe_b64decode(name).startswith(f"{folder.relative_to(PROJECT_DIR)}/".encode()):
            record.unlink()


@pytest.fixture(scope="module")
def finished_run():
    shutil.rmtree(PROJECT_DIR / ".test" / "results", ignore_errors=True)
    shutil.rmtree(PROJECT_DIR / ".test" / "resources", ignore_errors=True)
    forget_outputs(PROJECT_DIR / ".test")
    make_demo_dataset(TEST_INPUT, 600, seed=3)
    input_hash = sha256(TEST_INPUT)
    snakemake()
    return input_hash


@pytest.fixture(scope="module")
def finished_scgpt_run():
    """The tiny scGPT's run of the same input (made here when only scGPT's tests run), after Geneformer's."""
    if not TEST_INPUT.exists():
        make_demo_dataset(TEST_INPUT, 600, seed=3)
    shutil.rmtree(SCGPT_OUT, ignore_errors=True)
    forget_outputs(SCGPT_OUT)
    return snakemake(config=SCGPT_CONFIG)


@pytest.mark.parametrize("family", RUNS)
def test_outputs_of_each_family(family, request):
    """Embeddings under the family's key, finite, the input's obs; the map, the trace and the versions."""
    run = RUNS[family]
    request.getfixturevalue(run["fixture"])
    out = run["out"]
    embeddings = ad.read_h5ad(out / "embeddings" / "embeddings.h5ad")
    original = ad.read_h5ad(TEST_INPUT)
    assert embeddings.n_obs == original.n_obs == 600
    pd.testing.assert_frame_equal(embeddings.obs, original.obs)
    assert list(embeddings.obsm) == [run["key"]] and embeddings.obsm[run["key"]].shape == (600, run["width"])
    assert np.isfinite(embeddings.obsm[run["key"]]).all()  # every synthetic cell has vocabulary genes

    summary = json.loads((out / "report" / "embedding_summary.json").read_text())
    assert summary["knn_label_accuracy"] > 0.6  # 6 cell types: chance is about 0.17
    trace = pd.read_csv(out / "pipeline_info" / "execution_trace.tsv", sep="\t")
    assert (trace["process"] == "embed").sum() == 3 and (trace["process"] == "tokenize").sum() == 3
    assert (trace.loc[trace["process"] == "tokenize", "cells"] == 200).all()
    assert trace["peak_rss_mb"].notna().all() and (trace["realtime_s"] > 0).all()
    assert (trace.loc[trace["process"] == "embed", "cells_per_s"] > 0).all()
    versions = (out / "pipeline_info" / "software_versions.yml").read_text()
    assert f"profile: {run['profile']}" in versions


def test_scgpt_run_fine_tunes_and_evaluates(finished_scgpt_run):
    metrics = json.loads((SCGPT_OUT / "evaluate" / "metrics.json").read_text())
    assert metrics["model"]["base_model"] == "best_model" and metrics["validation_cells"] == 120
    assert metrics["fine_tuned"]["accuracy"] > 2 * metrics["chance_accuracy"]
    assert json.loads((SCGPT_OUT / "finetune" / "model" / "helixflow.json").read_text())["family"] == "scgpt"
    trace = pd.read_csv(SCGPT_OUT / "pipeline_info" / "execution_trace.tsv", sep="\t")
    assert {"label_split", "finetune", "evaluate"} <= set(trace["process"])
    check = json.loads((SCGPT_OUT / "qc" / "input_check.json").read_text())
    assert check["gene_ids"]["column"] == "var['gene_symbol']" and check["genes_in_vocabulary"] == 1_600


def test_outputs(finished_run):
    assert sha256(TEST_INPUT) == finished_run
    trace = pd.read_csv(OUT / "pipeline_info" / "execution_trace.tsv", sep="\t")
    assert {"label_split", "finetune", "evaluate"} <= set(trace["process"])
    # Cells come from each step's own metrics record, also for steps that are not per chunk.
    cells = trace.set_index("process")["cells"]
    assert cells["validate_input"] == cells["gather"] == 600 and cells["label_split"] == 600
    assert cells["evaluate"] == 120 and trace["peak_gpu_mb"].isna().all()  # CPU only


def test_report_holds_the_trace_and_step_figures(finished_run, tmp_path):
    snakemake("--report", str(tmp_path / "report.html"))
    report = (tmp_path / "report.html").read_text()
    for name in ("execution_trace.tsv", "step_resources.png", "embedding_map.png", "baseline_check.html"):
        assert name in report, name
    # The probe's warning shows exactly when the probe won; otherwise the comparison says fine-tuning held up.
    comparison = json.loads((OUT / "evaluate" / "metrics.json").read_text())["probe_comparison"]
    assert ("below the linear probe" in report) == comparison["probe_wins"]
    assert ("at least as good as the linear probe" in report) != comparison["probe_wins"]


def test_finetune_outputs(finished_run):
    metrics = json.loads((OUT / "evaluate" / "metrics.json").read_text())
    assert metrics["validation_cells"] == 120 and metrics["chance_accuracy"] == pytest.approx(1 / 6)
    assert metrics["fine_tuned"]["accuracy"] > 0.8 and metrics["fine_tuned"]["macro_f1"] > 0.8
    assert metrics["linear_probe"]["accuracy"] > 0.8
    for name in ("summary.tsv", "per_class.tsv", "predictions.tsv", "confusion_matrix.png", "training_curve.png"):
        assert (OUT / "evaluate" / name).stat().st_size > 0
    model = FineTunedModel.open(OUT / "finetune" / "model")
    assert model.metadata["labels"] == metrics["classes"] and model.metadata["profile"] == "tiny"
    assert model.metadata["stop_reason"] and model.metadata["kept"]["epoch"] <= 2  # the tiny profile's 2 epochs
    comparison = metrics["probe_comparison"]
    assert comparison["probe_wins"] == any(metrics["linear_probe"][key] > metrics["fine_tuned"][key] for key in ("accuracy", "macro_f1"))
    assert not (OUT / "finetune" / "checkpoints").exists()
    runs = list((OUT / "mlruns").glob(f"*/{model.metadata['mlflow_run_id']}"))
    assert len(runs) == 1 and (runs[0] / "metrics" / "heldout_accuracy").is_file()
    assert (runs[0] / "artifacts" / "model" / "model.safetensors").is_file()


def test_rules_take_threads_and_resources_from_the_profile(finished_run):
    plan = snakemake("--dry-run", "--forcerun", "embed", "finetune", "evaluate", "split").stdout
    jobs = {}
    for block in plan.split("\nrule ")[1:] + plan.split("\nlocalrule ")[1:]:
        rule = block.split(":", 1)[0]
        threads = re.search(r"threads: (\d+)", block)
        resources = re.search(r"resources: (.*)", block)
        jobs[rule] = (int(threads.group(1)) if threads else 1, resources.group(1) if resources else "")
    profile = load_profile("tiny")
    for rule, kind in (("embed", "embed"), ("finetune", "finetune"), ("evaluate", "embed"), ("split", "light")):
        threads, resources = jobs[rule]
        assert threads == 2, rule
        # finetune also gets memory_mb_per_million_cells for the whole dataset's 600 cells
        per_cells = math.ceil(profile["memory_mb_per_million_cells"].get(rule, 0) * 600 / 1_000_000)
        assert f"mem_mb={profile['memory_mb'][kind] + per_cells}" in resources, (rule, resources)
    runtime = math.ceil(profile["runtime_min_per_10k_cells"]["finetune"] * 600 / 10_000)  # the whole dataset
    assert f"runtime={runtime}," in jobs["finetune"][1]


def geneformer_one_pass(out):
    files = ModelFiles(PROJECT_DIR / ".test" / "resources" / "models" / "tiny", "gf-6L-10M-i2048")
    tokenize_chunk(TEST_INPUT, files, out)
    table = open_tokens(out)
    return embed_tokens(load_encoder(files, torch.device("cpu")), table.column("input_ids").combine_chunks(),
                        table.column("length").to_numpy(), batch_size=32, special_tokens=False,
                        device=torch.device("cpu"))


def scgpt_one_pass(out):
    files = ScGPTFiles(PROJECT_DIR / ".test" / "resources" / "models" / "scgpt-tiny")
    scgpt_tokenization.tokenize_chunk(TEST_INPUT, files, out, gene_column="gene_symbol")
    return embed_token_table(files, open_tokens(out), batch_size=32, device=torch.device("cpu"))


@pytest.mark.parametrize("family", RUNS)
def test_chunked_embeddings_equal_one_pass(family, request, tmp_path):
    """The workflow's chunks, gathered, equal the family's own tokenizer and encoder run over the whole input."""
    run = RUNS[family]
    request.getfixturevalue(run["fixture"])
    direct = {"geneformer": geneformer_one_pass, "scgpt": scgpt_one_pass}[family](tmp_path / "all.arrow")
    chunked = ad.read_h5ad(run["out"] / "embeddings" / "embeddings.h5ad").obsm[run["key"]]
    np.testing.assert_allclose(chunked, direct, atol=1e-5)


def test_lint_and_format(finished_run):
    assert "good condition" in snakemake("--lint").stdout + snakemake("--lint").stderr
    fmt = subprocess.run(["snakefmt", "--check", "workflow"], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr


def test_failed_chunk_is_redone_alone(finished_run):
    before = ad.read_h5ad(OUT / "embeddings" / "embeddings.h5ad").obsm["X_geneformer"]
    shutil.rmtree(OUT / "embeddings")
    (OUT / "tokens" / "chunk-00001.arrow").write_bytes(b"not arrow")  # a damaged intermediate file
    failed = snakemake(*EMBED_ONLY, check=False)
    assert failed.returncode != 0
    assert "chunk-00001.arrow: not a readable tokenized chunk" in failed.stdout + failed.stderr
    assert not (OUT / "embeddings" / "chunks" / "chunk-00001.h5ad").exists()

    (OUT / "tokens" / "chunk-00001.arrow").unlink()  # the fix
    jobs = planned_jobs(*EMBED_ONLY)
    assert jobs.get("tokenize") == 1 and jobs.get("embed") == 1 and "split" not in jobs
    snakemake(*EMBED_ONLY)
    np.testing.assert_array_equal(ad.read_h5ad(OUT / "embeddings" / "embeddings.h5ad").obsm["X_geneformer"], before)


def test_killed_run_resumes_with_same_results(finished_run):
    before = ad.read_h5ad(OUT / "embeddings" / "embeddings.h5ad").obsm["X_geneformer"]
    shutil.rmtree(OUT / "embeddings")
    for tokens in (OUT / "tokens").glob("*.arrow"):
        tokens.unlink()
    process = subprocess.Popen([*SNAKEMAKE, "--configfile", CONFIG, "--cores", "1", *EMBED_ONLY], cwd=PROJECT_DIR, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((OUT / "logs" / "embed").glob("*.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job tree, mid-step
    process.wait()
    assert not (OUT / "embeddings" / "embeddings.h5ad").exists()
    snakemake("--unlock")
    snakemake(*EMBED_ONLY)
    np.testing.assert_array_equal(ad.read_h5ad(OUT / "embeddings" / "embeddings.h5ad").obsm["X_geneformer"], before)
