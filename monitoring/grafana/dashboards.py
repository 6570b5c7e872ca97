"""Generate the Grafana dashboard JSON of helixflow from Python (grafana-foundation-sdk).

Run ``python monitoring/grafana/dashboards.py`` after editing this file; it rewrites
``monitoring/grafana/dashboards/helixflow.json``, which Grafana's file provider loads.
tests/test_monitoring_config.py checks that the committed JSON equals what this file builds.
Metric names: the contract in docs/monitoring.md.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

DATASOURCE_UID = "helixflow-prometheus"
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"

# Label filters of the template variables; cAdvisor spells the Docker labels differently.
STEP = 'run=~"$run", model=~"$model"'
STAGE = 'container_label_helixflow_stage!="", container_label_helixflow_run=~"$run", container_label_helixflow_model=~"$model"'


def query(expr: str, legend: str) -> prometheus.Dataquery:
    """A Prometheus range query; refIds are set by `panel`.

    Parameters
    ----------
    expr : str
        PromQL, may use the template variables ``$run`` and ``$model``.
    legend : str
        Grafana legend format, e.g. ``"{{run}} {{step}}"``.
    """
    return prometheus.Dataquery().expr(expr).legend_format(legend).range().datasource(DATASOURCE)


def panel(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "") -> timeseries.Panel:
    """A time-series panel on the helixflow Prometheus datasource.

    Parameters
    ----------
    title : str
        Panel title (also the PNG name in docs/images/monitoring/).
    unit : str
        Grafana unit id, e.g. ``"s"``, ``"bytes"``, ``"percentunit"``.
    *queries : prometheus.Dataquery
        Its targets, given refIds A, B, ... in order.
    description : str
        Hover text of the panel.
    """
    built = timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
    for ref_id, target in zip("ABCDEFGH", queries):
        built.with_target(target.ref_id(ref_id))
    return built.span(12).height(8)


def airflow_panels() -> list[timeseries.Panel]:
    """Task outcomes, DAG run durations and DAG runs by state (airflow-exporter + helixflow collector)."""
    return [
        panel("Airflow task successes", "short",
              query('sum by (dag_id, task_id) (airflow_task_status{status="success"})', "{{dag_id}}.{{task_id}}"),
              description="Task instances in state success, per DAG and task (airflow_task_status)."),
        panel("Airflow task failures", "short",
              query('sum by (dag_id, task_id) (airflow_task_status{status=~"failed|upstream_failed"})',
                    "{{dag_id}}.{{task_id}}"),
              description="Task instances that failed or whose upstream failed, per DAG and task."),
        panel("DAG run duration", "s",
              query("dag_id_state:helixflow_airflow_dag_run_duration_seconds:mean", "mean {{dag_id}} {{state}}"),
              query("helixflow_airflow_dag_run_last_duration_seconds", "last {{dag_id}} {{state}}"),
              description="Finished DAG runs: mean over all runs and the last run, per DAG and final state."),
        panel("DAG runs by state", "short",
              query("sum by (dag_id, status) (airflow_dag_status)", "{{dag_id}} {{status}}"),
              description="DAG runs in the metadata database, per DAG and state (airflow_dag_status)."),
    ]


def workflow_panels() -> list[timeseries.Panel]:
    """Whole runs and their steps, from the metrics every step pushes to the Pushgateway."""
    return [
        panel("Run duration", "s",
              query(f"helixflow_workflow_duration_seconds{{{STEP}}}", "{{run}} ({{model}})"),
              description="Wall time of the run's last snakemake invocation (one stage, when Airflow runs it stage by stage)."),
        panel("Run success", "short",
              query(f"helixflow_workflow_success{{{STEP}}}", "{{run}} ({{model}})"),
              description="1: the run finished OK, 0: it failed."),
        panel("Cells processed per run", "short",
              query(f"helixflow_workflow_cells{{{STEP}}}", "{{run}} ({{model}})")),
        panel("Cells per second per run", "short",
              query(f"helixflow_workflow_cells_per_second{{{STEP}}}", "{{run}} ({{model}})")),
        panel("Step duration", "s",
              query(f"helixflow_step_duration_seconds{{{STEP}}}", "{{run}} {{step}} {{chunk}}")),
        panel("Step cells per second", "short",
              query(f"helixflow_step_cells_per_second{{{STEP}}}", "{{run}} {{step}} {{chunk}}")),
        panel("Step peak RSS", "bytes",
              query(f"helixflow_step_peak_rss_bytes{{{STEP}}}", "{{run}} {{step}} {{chunk}}"),
              description="Peak resident memory of the step's process and its children."),
        panel("Step CPU seconds", "s",
              query(f"helixflow_step_cpu_seconds{{{STEP}}}", "{{run}} {{step}} {{chunk}}"),
              description="User + system CPU time of the step's process and its children."),
        panel("Steps running", "s",
              query(f"helixflow:step_running_age_seconds{{{STEP}}}", "{{run}} {{step}} {{chunk}}"),
              description="Age of the steps that started and have not pushed their end yet."),
    ]


def container_panels() -> list[timeseries.Panel]:
    """Stage containers (cAdvisor) and the host (node-exporter)."""
    return [
        panel("Stage container CPU", "short",
              query(f"sum by (container_label_helixflow_run, container_label_helixflow_stage) "
                    f"(rate(container_cpu_usage_seconds_total{{{STAGE}}}[1m]))",
                    "{{container_label_helixflow_run}} {{container_label_helixflow_stage}}"),
              description="CPU cores used by the containers of each stage (cAdvisor)."),
        panel("Stage container memory", "bytes",
              query(f"sum by (container_label_helixflow_run, container_label_helixflow_stage) "
                    f"(container_memory_working_set_bytes{{{STAGE}}})",
                    "{{container_label_helixflow_run}} {{container_label_helixflow_stage}}"),
              description="Working set of the containers of each stage (cAdvisor)."),
        panel("Stage container memory / limit", "percentunit",
              query(f"container:container_memory_working_set_bytes:ratio_to_limit{{{STAGE}}}",
                    "{{container_label_helixflow_run}} {{container_label_helixflow_stage}} {{name}}"),
              description="Working set over the container's memory limit; the alert fires above 90%."),
        panel("Node CPU busy", "percentunit",
              query('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))', "{{instance}}")),
        panel("Node memory", "bytes",
              query("node_memory_MemTotal_bytes - node_memory_MemAvailable_bytes", "used {{instance}}"),
              query("node_memory_MemTotal_bytes", "total {{instance}}")),
    ]


def gpu_panels() -> list[timeseries.Panel]:
    """DCGM exporter (compose profile gpu) and the steps' own peak GPU memory."""
    return [
        panel("GPU utilisation", "percent",
              query("DCGM_FI_DEV_GPU_UTIL", "GPU {{gpu}} {{Hostname}}")),
        panel("GPU framebuffer used", "decmbytes",
              query("DCGM_FI_DEV_FB_USED", "GPU {{gpu}} {{Hostname}}")),
        panel("Step peak GPU memory", "bytes",
              query(f"helixflow_step_peak_gpu_memory_bytes{{{STEP}}}", "{{run}} {{step}} {{chunk}}"),
              description="Pushed only by steps that used a GPU."),
    ]


def variable(name: str) -> dashboard.QueryVariable:
    """A multi-value template variable over the label `name` of the steps' metrics ("All" = any)."""
    return (dashboard.QueryVariable(name).label(name).datasource(DATASOURCE)
            .query(f"label_values(helixflow_step_started_timestamp_seconds, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def helixflow_dashboard() -> dict:
    """The "helixflow" dashboard as Grafana's JSON model (a plain dict).

    Returns
    -------
    dict
        Rows Airflow, Workflow, Containers and GPU; panel ids 1, 2, ... in layout order.
    """
    rows = {"Airflow": airflow_panels(), "Workflow": workflow_panels(),
            "Containers": container_panels(), "GPU": gpu_panels()}
    built = (dashboard.Dashboard("helixflow").uid("helixflow").tags(["helixflow"])
             .description("Airflow task outcomes, workflow runs and steps, container and GPU resources")
             .time("now-6h", "now").refresh("30s").with_variable(variable("run")).with_variable(variable("model")))
    ids = itertools.count(1)
    for title, panels in rows.items():
        built.with_row(dashboard.Row(title).id(next(ids)))
        for each in panels:
            built.with_panel(each.id(next(ids)))
    # A JSON round trip turns the SDK's model objects into plain dicts.
    return json.loads(json.dumps(built.build(), cls=JSONEncoder))


def main() -> None:
    """Write helixflow.json into the dashboards folder that Grafana's provider reads."""
    path = DASHBOARDS_DIR / "helixflow.json"
    path.write_text(json.dumps(helixflow_dashboard(), indent=2) + "\n")
    print(path)


if __name__ == "__main__":
    main()
