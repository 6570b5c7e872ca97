"""The front door recovers by itself: kill -9 at every step, SIGTERM, one run per folder, memory, provenance.

The workflow tests drive `helixflow run` as a user does. One uninterrupted reference run is compared
with a run that is killed (the front door's and snakemake's process groups, SIGKILL) as soon as
each step starts, and restarted with the same command each time, no `--unlock` or other manual step.
Measured on the shared 2-core machine (load 10-18): the whole module 13 min (reference run 330-510 s,
the kill chain of 11 runs 340-580 s, the memory test 30-85 s, the rerun-trigger test 35-105 s,
the lock tests 2-6 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from conftest import sha256
from helixflow.demo_data import make_demo_dataset
from helixflow.model_files import ModelFiles, stage_synthetic
from helixflow.profiles import DEFAULT_PROFILES_DIR
from helixflow.provenance import flat_checksums
from helixflow.run_lock import LOCK_NAME
from helixflow.tokenization import open_tokens

# Each step of the workflow and what appears (under the output folder) once one of its jobs runs:
# its log (folder), or for fine-tuning its first checkpoint, so that the kill tests resuming from it.
STEP_LOGS = {"validate": "logs/validate_input.log", "split": "logs/split", "tokenize": "logs/tokenize",
             "embed": "logs/embed", "gather": "logs/gather.log", "label_split": "logs/label_split.log",
             "finetune": "finetune/checkpoints/latest", "evaluate": "logs/evaluate.log", "report": "logs/pipeline_info.log"}
CELLS, CHUNK = 300, 150
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dataset, a staged tiny model, a profile folder with frequent fine-tuning checkpoints."""
    root = tmp_path_factory.mktemp("resume")
    dataset = make_demo_dataset(root / "cells.h5ad", CELLS, seed=5)
    stage_synthetic(ModelFiles(root / "models" / "tiny", "gf-6L-10M-i2048"))
    profiles = root / "profiles"
    profiles.mkdir()
    tiny = yaml.safe_load((DEFAULT_PROFILES_DIR / "tiny.yaml").read_text())
    tiny["train"].update(epochs=1, checkpoint_every=4)  # 15 steps, a checkpoint every 4
    (profiles / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (root / "work").mkdir()
    return root, dataset, sha256(dataset)


def command(root: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "helixflow.cli", "run", str(root / "cells.h5ad"), "--out", str(root / out),
            "--models-dir", str(root / "models"), "--profiles-dir", str(root / "profiles"), "--cores", "2",
            "--chunk-size", str(CHUNK), *extra]


def environment() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(root: Path, out: str, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, out, *extra), cwd=cwd or root / "work", capture_output=True, text=True,
                          env=environment(), timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run the others are compared with.

    While it runs, a second run on its folder from another working directory (as Airflow's stage
    containers work in the output folder) is refused at once, naming the first.
    """
    root, _, _ = setup
    out = root / "reference"
    started = time.monotonic()
    with open(root / "reference.log", "w") as log:
        first = subprocess.Popen(command(root, "reference"), cwd=root / "work", stdout=log, stderr=subprocess.STDOUT,
                                 env=environment())
    wait_for_snakemake(out, first)
    second = run(root, "reference", cwd=root)
    assert first.poll() is None
    assert second.returncode == 75, second.stderr[-2000:]
    assert f"another helixflow run is using this output folder (PID {first.pid}, snakemake PID" in second.stderr
    holder = lock_holder(out)
    assert f"on host {holder['host']}, started {holder['started']}, in {root / 'work'}: helixflow run" in second.stderr
    assert first.wait(timeout=TIMEOUT_S) == 0, (root / "reference.log").read_text()[-4000:]
    print(f"reference run: {time.monotonic() - started:.0f} s")
    return out


def started_steps(out: Path, since: float) -> list[str]:
    """Steps with a job that wrote its sign of life (``STEP_LOGS``) after ``since``."""
    found = []
    for step, name in STEP_LOGS.items():
        path = out / name
        logs = list(path.iterdir()) if path.is_dir() else [path] if path.exists() else []
        if any(log.stat().st_mtime >= since for log in logs):
            found.append(step)
    return found


def lock_holder(out: Path) -> dict:
    text = (out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""
    return json.loads(text) if text.strip() else {}


def wait_for_snakemake(out: Path, process: subprocess.Popen) -> int:
    """Snakemake's PID, once the front door ``process`` has recorded it in its lock."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (lock_holder(out).get("pid") == process.pid and lock_holder(out).get("snakemake_pid")):
        assert process.poll() is None and time.monotonic() < deadline, "the front door ended before snakemake started"
        time.sleep(0.1)
    return lock_holder(out)["snakemake_pid"]


def kill_all(groups: list[int]) -> None:
    """SIGKILL whole process groups (what a container kill or an OOM of the node does), then wait."""
    members = [p for p in psutil.process_iter() if _pgid(p.pid) in groups]
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs(members, timeout=30)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def assert_same_results(out: Path, reference: Path) -> None:
    done, expected = ad.read_h5ad(out / "embeddings" / "embeddings.h5ad"), ad.read_h5ad(reference / "embeddings" / "embeddings.h5ad")
    np.testing.assert_array_equal(done.obsm["X_geneformer"], expected.obsm["X_geneformer"])
    pd.testing.assert_frame_equal(done.obs, expected.obs)
    for tokens in sorted((reference / "tokens").glob("*.arrow")):
        assert open_tokens(out / "tokens" / tokens.name).equals(open_tokens(tokens)), tokens.name
    metrics, expected_metrics = (json.loads((run / "evaluate" / "metrics.json").read_text()) for run in (out, reference))
    assert metrics["model"].pop("mlflow_run_id") != expected_metrics["model"].pop("mlflow_run_id")  # each run its own
    assert metrics == expected_metrics
    for table in ("finetune/label_split.tsv", "evaluate/predictions.tsv"):
        assert (out / table).read_bytes() == (reference / table).read_bytes(), table
    assert (out / "report.html").stat().st_size > 0


def test_killed_at_every_step_resumes_to_the_same_results(setup, reference):
    """kill -9 as each step starts, then the same command each time; once, SIGTERM instead."""
    root, dataset, input_hash = setup
    out = root / "killed"
    killed: list[str] = []
    terminated = None
    started = time.monotonic()
    for attempt in range(2 * len(STEP_LOGS) + 2):
        launched = time.time()
        with open(root / f"killed-{attempt}.log", "w") as log:
            process = subprocess.Popen(command(root, "killed"), cwd=root / "work", stdout=log, stderr=subprocess.STDOUT,
                                       env=environment(), start_new_session=True)
        snakemake_pid = wait_for_snakemake(out, process)
        while process.poll() is None:
            fresh = [step for step in started_steps(out, launched) if step not in killed]
            if fresh:
                break
            time.sleep(0.1)
        if process.poll() is not None:
            break  # nothing was left to interrupt: this run finished
        step = fresh[0]
        if attempt == 3 and terminated is None:
            terminated = stop_with_sigterm(process, out, snakemake_pid, step)
            continue
        kill_all([process.pid, snakemake_pid])
        killed.append(step)
    assert process.wait(timeout=TIMEOUT_S) == 0, (root / f"killed-{attempt}.log").read_text()[-4000:]
    runtime = time.monotonic() - started
    assert sorted(killed) == sorted(STEP_LOGS), killed
    assert terminated is not None
    log_text = "".join(path.read_text() for path in root.glob("killed-*.log"))
    assert "LockException" not in log_text and "cannot be locked" not in log_text
    assert "resuming an interrupted run of this folder" in log_text
    assert "resumed at optimizer step" in (out / "logs" / "finetune.log").read_text()
    assert_same_results(out, reference)
    assert sha256(dataset) == input_hash
    print(f"killed at {', '.join(killed)} (SIGTERM at {terminated}); {attempt + 1} runs in {runtime:.0f} s")


def stop_with_sigterm(process: subprocess.Popen, out: Path, snakemake_pid: int, step: str) -> str:
    """SIGTERM to the front door alone: it ends snakemake and the running jobs, removes partial files, exits 143."""
    group = [p for p in psutil.process_iter() if _pgid(p.pid) == snakemake_pid]
    assert any(" helixflow step " in f" {' '.join(p.info['cmdline'] or [])} " for p in psutil.process_iter(["cmdline"])
               if p.pid in {member.pid for member in group}), "no running job to stop"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(group, timeout=5)
    assert not alive, alive  # snakemake and every job ended
    assert not list(out.rglob(".*.partial*")), list(out.rglob(".*.partial*"))
    assert lock_holder(out) == {}  # a clean end: the next run is not told about an interrupted one
    return step


def test_memory_bounds_parallel_jobs_and_retries_get_more(setup):
    from helixflow.local_resources import jobs_memory_mb, machine_memory_mb

    root, _, _ = setup
    meminfo = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
    assert 0 < machine_memory_mb() <= meminfo and jobs_memory_mb() == machine_memory_mb() - 1024
    default = run(root, "memory", "--dry-run")
    assert f"--resources mem_mb={jobs_memory_mb()} " in default.stderr
    # 1000 MB for all jobs: each asks for 1500 (the tiny profile), so they run one at a time.
    result = run(root, "memory", "--until", "split", "--memory", "1000", "--cores", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resources mem_mb=1000" in result.stderr and "jobs' memory 1,000 MB" in result.stderr
    records = [json.loads(path.read_text()) for path in (root / "memory" / "pipeline_info" / "steps").rglob("*.json")]
    spans = sorted((r["started"], r["finished"]) for r in records)
    assert len(spans) == 1 + CELLS // CHUNK
    assert all(previous[1] <= following[0] for previous, following in zip(spans, spans[1:])), spans

    # A failed job is tried once more with twice the memory (within the machine's) and time.
    (root / "memory" / "chunks" / "chunk-00001.h5ad").write_bytes(b"damaged")
    failed = run(root, "memory", "--until", "tokenize", "--memory", "5000")
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    tokenize_jobs = [block for block in text.split("rule tokenize:")[1:] if "wildcards: chunk=chunk-00001" in block.split("Shell command")[0]]
    assert len(tokenize_jobs) == 2, text[-3000:]
    assert "mem_mb=1500" in tokenize_jobs[0] and "runtime=1," in tokenize_jobs[0]
    assert "mem_mb=3000" in tokenize_jobs[1] and "runtime=2," in tokenize_jobs[1]


def test_provenance_is_recorded(setup, reference):
    root, _, _ = setup
    files = ModelFiles(root / "models" / "tiny", "gf-6L-10M-i2048")
    record = ad.read_h5ad(reference / "embeddings" / "embeddings.h5ad").uns["helixflow"]["provenance"]
    assert record["software"]["helixflow"] == "0.1.0" and record["software"]["helical"] == "2.2.0"
    assert record["software"]["torch"].startswith("2.13.0")
    expected = {"geneformer/v1/token_dictionary.pkl": sha256(files.token_dictionary),
                "geneformer/v1/gf-6L-10M-i2048/pytorch_model.bin": sha256(files.model_dir / "pytorch_model.bin")}
    checksums = flat_checksums(record["model"]["files_sha256"])
    assert expected.items() <= checksums.items() and len(checksums) == 6 and record["model"]["version"] == "v1"
    versions = yaml.safe_load((reference / "pipeline_info" / "software_versions.yml").read_text())
    assert versions["workflow"]["snakemake"] == "9.27.1" and versions["embed"]["torch"] == record["software"]["torch"]
    assert versions["model"]["files_sha256"] == checksums


def planned(root: Path, out: str) -> dict[str, str]:
    """Rule -> the reason snakemake gives for (re)running its first job, from a dry run of the same command."""
    result = run(root, out, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    jobs = {}
    for block in text.split("\nrule ")[1:] + text.split("\nlocalrule ")[1:]:
        rule, _, body = block.partition(":")
        reason = next((line.strip() for line in body.splitlines() if line.strip().startswith("reason:")), "")
        jobs.setdefault(rule.strip(), reason)
    return jobs


def test_changed_versions_or_model_files_rerun_the_affected_steps(setup, reference):
    root, _, _ = setup
    assert planned(root, "reference") == {}  # finished: nothing to do
    files = ModelFiles(root / "models" / "tiny", "gf-6L-10M-i2048")
    weights = files.model_dir / "pytorch_model.bin"
    saved = weights.read_bytes()
    stat = weights.stat()
    try:
        # Other weights with the old modification time: only their checksum tells them apart.
        stage_synthetic(ModelFiles(root / "other-model", files.model_name), seed=7)
        shutil.copyfile(root / "other-model" / files.model_dir.relative_to(files.prefix) / "pytorch_model.bin", weights)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        jobs = planned(root, "reference")
        assert {"embed", "finetune"} <= set(jobs) and "params" in jobs["embed"].lower(), jobs
        assert not {"validate_input", "split", "tokenize", "label_split"} & set(jobs), jobs
    finally:
        weights.write_bytes(saved)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned(root, "reference") == {}

    # An older helixflow recorded in snakemake's metadata: every step is redone.
    metadata = root / "work" / ".snakemake" / "metadata"
    records = {path: path.read_text() for path in metadata.iterdir()}
    try:
        for path, text in records.items():
            path.write_text(text.replace("helixflow=0.1.0", "helixflow=0.0.9"))
        jobs = planned(root, "reference")
        assert {"validate_input", "split", "tokenize", "embed", "gather", "label_split", "finetune", "evaluate"} <= set(jobs), jobs
        # The dry run names the first reason only (upstream jobs rerun); snakemake lists each changed output too.
        listed = run(root, "reference", "--dry-run", "--", "--list-params-changes")
        assert listed.returncode == 0, listed.stderr[-3000:]
        changed = {Path(line.strip()).relative_to(root / "reference").as_posix()
                   for line in (listed.stdout + listed.stderr).splitlines() if line.strip().startswith(str(root / "reference"))}
        assert {"qc/input_check.json", "chunks/chunk-00000.h5ad", "tokens/chunk-00001.arrow", "embeddings/chunks/chunk-00000.h5ad",
                "embeddings/embeddings.h5ad", "finetune/label_split.tsv", "finetune/model", "evaluate/metrics.json",
                "report/embedding_map.png", "pipeline_info/software_versions.yml"} <= changed, changed
    finally:
        for path, text in records.items():
            path.write_text(text)


def test_a_second_lock_names_the_first_and_a_killed_holder_frees_it(tmp_path):
    from helixflow.run_lock import OutputFolderInUse, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from helixflow.run_lock import RunLock; "
                               f"RunLock({str(tmp_path)!r}, 'helixflow run x.h5ad').acquire(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(OutputFolderInUse, match=f"PID {holder.pid} on host .*: helixflow run x.h5ad"):
        RunLock(tmp_path, "helixflow run y.h5ad").acquire()
    holder.kill()  # kill -9: the kernel drops its lock
    holder.wait()
    with RunLock(tmp_path, "helixflow run y.h5ad") as lock:
        assert lock.interrupted.pid == holder.pid and lock.interrupted.command == "helixflow run x.h5ad"
    with RunLock(tmp_path, "helixflow run y.h5ad") as lock:
        assert lock.interrupted is None  # the last run ended cleanly


def test_stale_snakemake_locks_are_cleared_unless_a_plain_snakemake_works_there(tmp_path):
    from helixflow.run_lock import clear_stale_snakemake_locks

    work, out = tmp_path / "work", tmp_path / "work" / "results" / "run"
    locks = work / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    ours = locks / "0.output.lock"
    other = locks / "1.output.lock"

    def leave_locks():
        ours.write_text("results/run/chunks/chunk-00000.h5ad\nresults/run/qc/input_check.json\n")
        other.write_text(f"{tmp_path / 'elsewhere' / 'x.h5ad'}\n")

    leave_locks()
    assert clear_stale_snakemake_locks(work, out) == [ours]
    assert not ours.exists() and other.exists()

    # A plain snakemake (no helixflow lock) running in the same working directory may own them.
    (work / "Snakefile").write_text('rule wait:\n    output: "waited"\n    shell: "sleep 60; touch {output}"\n')
    plain = subprocess.Popen([str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "--nolock"], cwd=work,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any("sleep 60" in " ".join(p.cmdline()) for p in psutil.Process(plain.pid).children(recursive=True)):
            assert time.monotonic() < deadline and plain.poll() is None
            time.sleep(0.2)
        leave_locks()
        assert clear_stale_snakemake_locks(work, out) == []
        assert ours.exists()
    finally:
        os.killpg(plain.pid, signal.SIGKILL)
        plain.wait()
