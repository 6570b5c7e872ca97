"""Step metrics: a real step pushes to a real Pushgateway (Debian's prometheus-pushgateway)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import pushed_groups
from prometheus_stack import free_port


def run_step(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "helixflow.cli", "step", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_split_pushes_its_figures_and_writes_its_record(pushgateway, dataset, tmp_path):
    env = {"HELIXFLOW_PUSHGATEWAY": pushgateway, "HELIXFLOW_RUN": "metrics-ok", "HELIXFLOW_MODEL": "tiny",
           "HELIXFLOW_METRICS_DIR": str(tmp_path / "steps")}
    done = run_step(["split", str(dataset), str(tmp_path / "chunk.h5ad"), "--start", "100", "--stop", "350",
                     "--chunk-name", "chunk-00001"], env)
    assert done.returncode == 0, done.stderr
    group = next(g for g in pushed_groups(pushgateway) if g["labels"].get("run") == "metrics-ok")
    assert group["labels"] == {"job": "helixflow", "run": "metrics-ok", "step": "split", "chunk": "chunk-00001"}
    assert group["model"] == {"tiny"}
    values = group["values"]
    assert values["helixflow_step_success"] == 1 and values["helixflow_step_cells"] == 250
    assert 0 < values["helixflow_step_duration_seconds"] < 300
    assert values["helixflow_step_cells_per_second"] == pytest.approx(250 / values["helixflow_step_duration_seconds"])
    assert values["helixflow_step_peak_rss_bytes"] > 50 * 2**20  # python + anndata are far above 50 MB
    assert values["helixflow_step_cpu_seconds"] > 0
    assert values["helixflow_step_finished_timestamp_seconds"] >= values["helixflow_step_started_timestamp_seconds"]
    assert "helixflow_step_peak_gpu_memory_bytes" not in values  # no GPU used
    record = json.loads((tmp_path / "steps" / "split" / "chunk-00001.json").read_text())
    assert record["cells"] == 250 and record["success"] and record["run"] == "metrics-ok"


def test_failed_step_pushes_failure_and_writes_no_record(pushgateway, tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    env = {"HELIXFLOW_PUSHGATEWAY": pushgateway, "HELIXFLOW_RUN": "metrics-bad", "HELIXFLOW_MODEL": "tiny",
           "HELIXFLOW_METRICS_DIR": str(tmp_path / "steps")}
    done = run_step(["split", str(bad), str(tmp_path / "chunk.h5ad"), "--start", "0", "--stop", "10"], env)
    assert done.returncode == 2 and str(bad) in done.stderr
    group = next(g for g in pushed_groups(pushgateway) if g["labels"].get("run") == "metrics-bad")
    assert group["labels"]["chunk"] == "all" and group["values"]["helixflow_step_success"] == 0
    assert not (tmp_path / "steps").exists()


def test_unreachable_pushgateway_does_not_fail_the_step(dataset, tmp_path):
    done = run_step(["split", str(dataset), str(tmp_path / "chunk.h5ad"), "--start", "0", "--stop", "10"],
                    {"HELIXFLOW_PUSHGATEWAY": f"http://127.0.0.1:{free_port()}"})
    assert done.returncode == 0, done.stderr
    assert "warning: metrics not pushed" in done.stderr
    assert (tmp_path / "chunk.h5ad").is_file()
