"""What each workflow step reports about itself: duration, cells, cells/s, peak memory, CPU time.

A step's figures go to two places:

- a Prometheus Pushgateway (batch jobs end before Prometheus could scrape them), when
  ``HELIXFLOW_PUSHGATEWAY`` names one: once at the start (so a step that runs far too long is
  visible while it runs) and once at the end, replacing the group ``job="helixflow", run, step,
  chunk``;
- a JSON record under ``HELIXFLOW_METRICS_DIR`` (``<step>/<chunk>.json``), which the
  ``pipeline_info`` trace and the workflow report read.

The workflow sets ``HELIXFLOW_RUN``, ``HELIXFLOW_MODEL``, ``HELIXFLOW_PUSHGATEWAY`` and
``HELIXFLOW_METRICS_DIR`` for its jobs (``workflow/rules/common.smk``). Monitoring never fails a
step: an unreachable Pushgateway is a warning on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from helixflow.outputs import atomic_path

LOGGER = logging.getLogger(__name__)
STEP_JOB = "helixflow"
WORKFLOW_JOB = "helixflow_workflow"
PUSH_TIMEOUT_S = 5.0


@dataclass
class StepRecord:
    """One step's figures, as pushed and as written for the trace."""

    run: str
    step: str
    chunk: str
    model: str
    started: float
    cells: int = 0
    success: bool = False
    finished: float | None = None
    peak_rss_bytes: int = 0
    cpu_seconds: float = 0.0
    peak_gpu_memory_bytes: int | None = None

    @property
    def duration_seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.duration_seconds if self.duration_seconds > 0 else 0.0


def environment_labels() -> dict[str, str]:
    """Run and model as the workflow set them; outside a workflow run, 'adhoc' and 'unknown'."""
    return {"run": os.environ.get("HELIXFLOW_RUN") or "adhoc", "model": os.environ.get("HELIXFLOW_MODEL") or "unknown"}


@contextmanager
def step_metrics(step: str, chunk: str = "all"):
    """Measure the step run inside the block; the block sets ``record.cells``.

    Pushes a 'started' group at entry and the full figures at exit (``success`` 0 when the block
    raised), and writes the JSON record of a successful step.
    """
    labels = environment_labels()
    record = StepRecord(run=labels["run"], step=step, chunk=chunk, model=labels["model"], started=time.time())
    gateway = os.environ.get("HELIXFLOW_PUSHGATEWAY")
    if gateway:
        _push(gateway, STEP_JOB, _step_registry(record), _grouping(record))
    try:
        yield record
        record.success = True
    finally:
        _finish(record)
        if gateway:
            _push(gateway, STEP_JOB, _step_registry(record), _grouping(record))
        metrics_dir = os.environ.get("HELIXFLOW_METRICS_DIR")
        if metrics_dir and record.success:
            write_record(record, Path(metrics_dir) / step / f"{chunk}.json")


def _finish(record: StepRecord) -> None:
    record.finished = time.time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is in KiB on Linux; the children's figure is the largest child, not a sum.
    record.peak_rss_bytes = max(own.ru_maxrss, children.ru_maxrss) * 1024
    record.cpu_seconds = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    record.peak_gpu_memory_bytes = _peak_gpu_memory()


def _peak_gpu_memory() -> int | None:
    """torch's peak allocated GPU memory, when this process used CUDA; None otherwise."""
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(max(torch.cuda.max_memory_allocated(device) for device in range(torch.cuda.device_count())))


def _grouping(record: StepRecord) -> dict[str, str]:
    return {"run": record.run, "step": record.step, "chunk": record.chunk}


def _step_registry(record: StepRecord) -> CollectorRegistry:
    """The step's gauges; while it runs, only its start time (the 'far too long' alert's input)."""
    registry = CollectorRegistry()

    def gauge(name: str, description: str, value: float) -> None:
        Gauge(name, description, ["model"], registry=registry).labels(model=record.model).set(value)

    gauge("helixflow_step_started_timestamp_seconds", "Unix time the step started", record.started)
    if record.finished is None:
        return registry
    gauge("helixflow_step_finished_timestamp_seconds", "Unix time the step ended", record.finished)
    gauge("helixflow_step_success", "1 if the step finished without error, 0 if it failed", float(record.success))
    gauge("helixflow_step_duration_seconds", "Wall time of the step", record.duration_seconds)
    gauge("helixflow_step_cells", "Cells the step processed", record.cells)
    gauge("helixflow_step_cells_per_second", "Cells processed per second of wall time", record.cells_per_second)
    gauge("helixflow_step_peak_rss_bytes", "Peak resident memory of the step process or its largest child",
          record.peak_rss_bytes)
    gauge("helixflow_step_cpu_seconds", "User and system CPU time of the step and its children", record.cpu_seconds)
    if record.peak_gpu_memory_bytes is not None:
        gauge("helixflow_step_peak_gpu_memory_bytes", "Peak GPU memory torch allocated", record.peak_gpu_memory_bytes)
    return registry


def push_workflow(run: str, model: str, started: float, cells: int, success: bool) -> None:
    """The figures of one snakemake invocation (its onsuccess/onerror handler), when there is a Pushgateway."""
    gateway = os.environ.get("HELIXFLOW_PUSHGATEWAY")
    if not gateway:
        return
    finished = time.time()
    duration = finished - started
    registry = CollectorRegistry()
    values = {
        "helixflow_workflow_duration_seconds": ("Wall time of the snakemake invocation", duration),
        "helixflow_workflow_success": ("1 if the invocation finished without error, 0 if a job failed", float(success)),
        "helixflow_workflow_cells": ("Cells in the input dataset", cells),
        "helixflow_workflow_cells_per_second": ("Input cells per second of wall time", cells / duration if duration else 0.0),
        "helixflow_workflow_finished_timestamp_seconds": ("Unix time the invocation ended", finished),
    }
    for name, (description, value) in values.items():
        Gauge(name, description, ["model"], registry=registry).labels(model=model).set(value)
    _push(gateway, WORKFLOW_JOB, registry, {"run": run})


def _push(gateway: str, job: str, registry: CollectorRegistry, grouping: dict[str, str]) -> None:
    try:
        push_to_gateway(gateway, job=job, registry=registry, grouping_key=grouping, timeout=PUSH_TIMEOUT_S)
    except OSError as error:  # includes URLError and timeouts
        LOGGER.warning("warning: metrics not pushed to %s: %s", gateway, error)


def write_record(record: StepRecord, path: Path) -> None:
    """The step's figures as JSON, for the pipeline_info trace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = {**asdict(record), "duration_seconds": record.duration_seconds, "cells_per_second": record.cells_per_second}
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(figures, indent=2) + "\n")


def read_records(metrics_dir: str | Path) -> dict[tuple[str, str], dict]:
    """The JSON records of a run, keyed by (step, chunk)."""
    records = {}
    for path in sorted(Path(metrics_dir).glob("*/*.json")):
        records[(path.parent.name, path.stem)] = json.loads(path.read_text())
    return records
