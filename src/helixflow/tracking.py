"""Experiment tracking with MLflow: parameters, metrics and models of each fine-tune.

The default store is a folder of files beside the run's outputs (no server, nothing on the
network); a tracking server is used when a URI such as ``http://mlflow.example:5000`` is
configured. MLflow is imported only here, only when a run is tracked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse


def resolve_tracking_uri(uri: str | Path) -> str:
    """A tracking URI as MLflow takes it: a plain path becomes an absolute ``file:`` URI."""
    text = str(uri)
    return Path(text).resolve().as_uri() if urlparse(text).scheme == "" else text


class Tracker:
    """The open MLflow run of one fine-tune (see :func:`tracked_run`)."""

    def __init__(self, mlflow, run_id: str) -> None:
        self._mlflow = mlflow
        self.run_id = run_id

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params({key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({key: str(value) for key, value in tags.items()})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a folder's files, under ``artifact_path`` of the run."""
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def tracked_run(uri: str | Path, *, experiment: str | None = None, run_name: str | None = None,
                run_id: str | None = None) -> Iterator[Tracker]:
    """Open a run in ``experiment`` (or, given ``run_id``, reopen that run); close it as finished or failed.

    A local store is MLflow's file store, which MLflow 3 allows only when asked to
    (``MLFLOW_ALLOW_FILE_STORE``); usage telemetry is off unless the user turned it on.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolve_tracking_uri(uri)
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    mlflow.set_tracking_uri(uri)
    if run_id is None:
        mlflow.set_experiment(experiment)
    else:  # the run's own experiment: MLflow refuses to reopen a run under another active one
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        yield Tracker(mlflow, run.info.run_id)
