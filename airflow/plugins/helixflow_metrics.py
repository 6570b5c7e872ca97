"""Durations of finished DAG runs as Prometheus metrics, served at the api-server's /admin/metrics/.

airflow-exporter (PyPI, 2.1.0) serves prometheus_client's global ``REGISTRY`` at ``/admin/metrics/``
but reports durations of *running* DAG runs only. This plugin adds a collector to the same registry,
read from the metadata database at every scrape (nothing is lost when a task process exits early):

``helixflow_airflow_dag_run_duration_seconds{dag_id,state}``       summary (``_sum``, ``_count``)
                                                                  over finished runs
``helixflow_airflow_dag_run_last_duration_seconds{dag_id,state}``  the most recently finished run

``state`` is ``success`` or ``failed``. Names are fixed by the monitoring contract (docs/airflow.md).
The endpoint answers only with the bearer token that helixflow_metrics_auth.py (next to this file) checks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from airflow.models.dagrun import DagRun
from airflow.plugins_manager import AirflowPlugin
from airflow.utils.session import create_session
from airflow.utils.state import DagRunState
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, literal_column, select

log = logging.getLogger(__name__)

FINISHED_STATES = (DagRunState.SUCCESS.value, DagRunState.FAILED.value)
LABELS = ["dag_id", "state"]


def duration_seconds(dialect: str):
    """SQL expression of a DAG run's ``end_date - start_date`` in seconds.

    Parameters
    ----------
    dialect : str
        SQLAlchemy dialect name of the metadata database (sqlite, postgresql or mysql,
        the databases Airflow supports).

    Returns
    -------
    sqlalchemy.sql.ColumnElement
        A float expression over ``DagRun.start_date`` and ``DagRun.end_date``.
    """
    start, end = DagRun.start_date, DagRun.end_date
    if dialect == "sqlite":
        # SQLite stores timestamps as text; julianday() parses them (days, double precision).
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    if dialect == "mysql":
        return func.timestampdiff(literal_column("MICROSECOND"), start, end) / 1e6
    return func.extract("epoch", end - start)


def finished_run_stats(session) -> list:
    """Per (dag_id, state) of finished runs: count, total and latest duration, in one query.

    Window functions give the totals and the latest run of each group in a single pass, so a
    scrape costs one query however many runs the database holds.

    Parameters
    ----------
    session : sqlalchemy.orm.Session
        A session on the Airflow metadata database.

    Returns
    -------
    list of Row
        Rows with ``dag_id``, ``state``, ``count``, ``total`` and ``last`` (seconds).
    """
    duration = duration_seconds(session.get_bind().dialect.name)
    group = [DagRun.dag_id, DagRun.state]
    runs = (
        select(
            DagRun.dag_id,
            DagRun.state,
            func.count().over(partition_by=group).label("count"),
            func.sum(duration).over(partition_by=group).label("total"),
            duration.label("last"),
            func.row_number().over(partition_by=group, order_by=DagRun.end_date.desc()).label("newest"),
        )
        .where(DagRun.state.in_(FINISHED_STATES), DagRun.start_date.is_not(None), DagRun.end_date.is_not(None))
        .subquery()
    )
    query = select(runs.c.dag_id, runs.c.state, runs.c.count, runs.c.total, runs.c.last).where(runs.c.newest == 1)
    return session.execute(query).all()


class FinishedDagRunCollector(Collector):
    """Prometheus collector of finished DAG runs' durations, read from the metadata database."""

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples: names known at registration, no database query."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """Yield the duration summary and the last duration per (dag_id, state).

        Yields
        ------
        prometheus_client.core.Metric
            ``helixflow_airflow_dag_run_duration_seconds`` (summary) and
            ``helixflow_airflow_dag_run_last_duration_seconds`` (gauge).
        """
        summary, last = self._families()
        with create_session() as session:
            for row in finished_run_stats(session):
                labels = [row.dag_id, str(row.state)]
                summary.add_metric(labels, row.count, float(row.total))
                last.add_metric(labels, float(row.last))
        yield summary
        yield last

    @staticmethod
    def _families() -> tuple[SummaryMetricFamily, GaugeMetricFamily]:
        return (SummaryMetricFamily("helixflow_airflow_dag_run_duration_seconds",
                                    "Duration of finished DAG runs (end_date - start_date)", labels=LABELS),
                GaugeMetricFamily("helixflow_airflow_dag_run_last_duration_seconds",
                                  "Duration of the most recently finished DAG run", labels=LABELS))


def register(registry=REGISTRY) -> None:
    """Add the collector to the registry airflow-exporter serves, once per process.

    Parameters
    ----------
    registry : prometheus_client.registry.CollectorRegistry
        Defaults to prometheus_client's global registry (the one ``/admin/metrics/`` serves).
    """
    try:
        registry.register(FinishedDagRunCollector())
    except ValueError:
        # describe() names the metrics: a second import in this process finds them taken.
        log.debug("helixflow DAG-run collector already registered")


class HelixflowMetricsPlugin(AirflowPlugin):
    """Names the plugin in ``airflow plugins``; importing this module registers the collector."""

    name = "helixflow_metrics"


register()
