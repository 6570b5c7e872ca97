"""Which files of the watched folder start a helixflow run: the inbox's pure logic (stdlib only).

The ``helixflow_inbox`` task polls; each poll calls :func:`poll` with the files it finds and
the state it kept from the last poll (``RESULTS/.helixflow-inbox/state.json``), and starts
the runs it returns. ``helixflow_s3_inbox`` does the same with the objects under an S3 prefix
(:func:`scan_objects`, state in ``RESULTS/.helixflow-s3-inbox/``). A file starts a run when

- it is complete: a marker ``<file name>.done`` lies next to it, or (unless markers are
  required) its size and modification time are the same as at the previous poll. An S3
  object is always complete: it is listed only once its PUT or multipart upload completes;
- this version of it (size and mtime in nanoseconds: its fingerprint) has not started a
  run yet. A run's id is ``inbox__<run name>__<fingerprint>``, so a re-poll names the same
  run and cannot start a second one, and a file whose run failed runs again once it
  changes (a new fingerprint; an S3 object's is its ETag);
- its previous run is not still queued or running (the new version waits for it: both
  would write the same results folder).

A run started in the state but absent from Airflow (the trigger task failed) is started
again under the same id. Run names come from the path relative to the watched folder:
``x.h5ad`` gives ``x``; nested or unusual names (``a/x.h5ad``) give a readable slug plus
a hash of the path (``a-x-1b2c3d4e``), so same-named files in two folders never share a
results folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".h5ad"
DONE_SUFFIX = ".done"
STATE_FILE = "state.json"
# DAG run states in which a run still writes its results folder.
ACTIVE_RUN_STATES = ("queued", "running")
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Arrival:
    """One file of the watched folder as one poll sees it."""

    relative: str
    size: int
    mtime_ns: int
    done_marker: bool

    @property
    def fingerprint(self) -> str:
        return f"{self.size}-{self.mtime_ns}"


@dataclass(frozen=True)
class ObjectArrival:
    """One object under the watched S3 prefix as one poll sees it."""

    relative: str
    etag: str

    @property
    def fingerprint(self) -> str:
        return self.etag.strip('"')

    @property
    def done_marker(self) -> bool:
        """Always: S3 lists an object only once its upload is complete (no partial objects)."""
        return True


def scan(inbox: Path) -> list[Arrival]:
    """The ``.h5ad`` files under ``inbox`` (recursively; hidden files and folders left out)."""
    inbox = Path(inbox)
    arrivals = []
    for path in sorted(inbox.rglob(f"*{SUFFIX}")):
        relative = path.relative_to(inbox)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        done = path.with_name(path.name + DONE_SUFFIX).exists()
        arrivals.append(Arrival(relative.as_posix(), stat.st_size, stat.st_mtime_ns, done))
    return arrivals


def scan_objects(client, bucket: str, prefix: str) -> list[ObjectArrival]:
    """The ``.h5ad`` objects under ``prefix`` of ``bucket`` (hidden path parts left out).

    Parameters
    ----------
    client
        A boto3 S3 client.
    bucket, prefix
        Where to look; ``prefix`` without its trailing ``/`` (empty: the whole bucket).
    """
    folder = f"{prefix}/" if prefix else ""
    arrivals = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for item in page.get("Contents", []):
            relative = item["Key"][len(folder):]
            if relative.endswith(SUFFIX) and not any(part.startswith(".") for part in relative.split("/")):
                arrivals.append(ObjectArrival(relative, item["ETag"]))
    return sorted(arrivals, key=lambda arrival: arrival.relative)


def run_name(relative: str) -> str:
    """The results folder name of a file at ``relative`` (POSIX path under the watched folder)."""
    stem = relative[: -len(SUFFIX)] if relative.endswith(SUFFIX) else relative
    if "/" not in stem and RUN_NAME.fullmatch(stem) and not stem.startswith((".", "-")):
        return stem
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stem.replace("/", "-")).lstrip(".-") or "input"
    return f"{slug[:80]}-{hashlib.sha256(relative.encode()).hexdigest()[:8]}"


def run_id(relative: str, fingerprint: str, *, source: str = "inbox") -> str:
    return f"{source}__{run_name(relative)}__{fingerprint}"


def run_status_of(ti, dag_id: str):
    """``run_status(run_id)`` for :func:`poll`: the state of that run of ``dag_id``, or None if absent."""
    def run_status(run_id: str) -> str | None:
        if not ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]):
            return None
        return ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)

    return run_status


def poll(arrivals: list[Arrival | ObjectArrival], state: dict, run_status, *, require_done_marker: bool = False,
         source: str = "inbox") -> tuple[list[dict], dict]:
    """Decide which files start a run now.

    Parameters
    ----------
    arrivals
        The files this poll found (:func:`scan`, or :func:`scan_objects`).
    state
        What the previous poll returned (``{}`` at first): per file, the fingerprint seen
        then and the run it started.
    run_status
        ``run_status(run_id)``: the state of that helixflow DAG run, or ``None`` if absent.
    require_done_marker
        Only a ``.done`` marker makes a file complete (for copies that may stall between polls).
    source
        The first part of the run ids: which inbox started the run.

    Returns
    -------
    runs, state
        One ``{"run_id", "relative", "run_name"}`` per run to start, and the state to keep.
    """
    new_state = dict(state)
    runs = []
    for arrival in arrivals:
        record = dict(state.get(arrival.relative, {}))
        stable = record.get("seen") == arrival.fingerprint and not require_done_marker
        record["seen"] = arrival.fingerprint
        started = record.get("started")
        if (arrival.done_marker or stable) and _should_start(arrival, started, run_status):
            record["started"] = {"fingerprint": arrival.fingerprint,
                                 "run_id": run_id(arrival.relative, arrival.fingerprint, source=source)}
            runs.append({"run_id": record["started"]["run_id"], "relative": arrival.relative,
                         "run_name": run_name(arrival.relative)})
        new_state[arrival.relative] = record
    return runs, new_state


def _should_start(arrival: Arrival, started: dict | None, run_status) -> bool:
    if started is None:
        return True
    status = run_status(started["run_id"])
    if started["fingerprint"] == arrival.fingerprint:
        return status is None  # this version's trigger never happened
    return status not in ACTIVE_RUN_STATES


def read_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(folder: Path, state: dict) -> None:
    """Replace the state file whole (a crash leaves the old one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{STATE_FILE}.partial"
    partial.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(partial, folder / STATE_FILE)
