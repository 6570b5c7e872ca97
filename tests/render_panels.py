"""Evaluate a Grafana dashboard's PromQL against a real Prometheus and draw each panel as a PNG.

No Grafana server runs on the development and CI machines: this stands in for it, so that a
test proves every panel query returns data and docs/monitoring.md can show what a panel shows.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from prometheus_stack import query_range

VARIABLE = re.compile(r"\$\{?(\w+)\}?")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def graph_panels(dashboard: dict) -> list[dict]:
    """The panels that have targets, also those nested in collapsed rows, in layout order."""
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return [panel for panel in panels if panel.get("targets")]


def dashboard_targets(dashboard: dict) -> list[tuple[int, str, str]]:
    """Every ``(panel id, panel title, expr)`` of a dashboard, one per target."""
    return [(panel["id"], panel["title"], target["expr"])
            for panel in graph_panels(dashboard) for target in panel["targets"]]


def substitute(expr: str, dashboard: dict, values: dict[str, str] | None = None) -> str:
    """Replace the dashboard's template variables in `expr`, as Grafana would.

    Parameters
    ----------
    expr : str
        PromQL with ``$name`` or ``${name}`` references.
    dashboard : dict
        Its ``templating.list`` names the variables; others (none expected) stay as they are.
    values : dict of str to str, optional
        Variable -> regex; a variable not given matches anything (``.*``, Grafana's "All").
    """
    names = {variable["name"] for variable in dashboard.get("templating", {}).get("list", [])}
    chosen = {name: ".*" for name in names} | (values or {})
    return VARIABLE.sub(lambda match: chosen.get(match.group(1), match.group(0)), expr)


def legend(legend_format: str, labels: dict[str, str]) -> str:
    """A series' legend: ``{{label}}`` filled in from its labels, or all labels without a format."""
    if not legend_format:
        return "{" + ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}"
    return LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), legend_format)


def file_name(title: str) -> str:
    """``"Stage container memory / limit"`` -> ``"stage-container-memory-limit.png"``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") + ".png"


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(float(timestamp), timezone.utc)


def draw(title: str, unit: str, lines: list[tuple[str, list]], window: tuple[float, float], path: Path) -> None:
    """Write one panel with data: a line per series (a dot when a series has one sample) over the query window."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots()
    for name, values in lines:
        times = [utc(t) for t, _ in values]
        axes.plot(times, [float(v) for _, v in values], marker="." if len(values) == 1 else None, label=name)
    # Beside the plot, as Grafana's legend table: many series would cover the lines.
    axes.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), ncols=1 + len(lines) // 14)
    # Grafana shows the dashboard's time range, not an autoscaled one (years around a lone point).
    axes.set_xlim(utc(window[0]), utc(window[1]))
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_title(title)
    axes.set_ylabel(unit)
    axes.set_xlabel("time (UTC)")
    figure.savefig(path, dpi=90)


def render_panels(prometheus_url: str, dashboard: dict, out_dir: Path, start: float, end: float,
                  step: float = 15.0, values: dict[str, str] | None = None) -> list[tuple[str, str, int]]:
    """Evaluate every panel's targets over a window and draw each panel that has data to ``out_dir/<title>.png``.

    Parameters
    ----------
    prometheus_url : str
        ``http://host:port`` of a Prometheus.
    dashboard : dict
        Grafana dashboard JSON model (e.g. ``json.load`` of monitoring/grafana/dashboards/helixflow.json).
    out_dir : Path
        Created if missing; one PNG per panel, named by `file_name`.
    start, end, step : float
        The window (Unix seconds) and resolution (seconds) of the range queries.
    values : dict of str to str, optional
        Template variable values (regexes); the others match anything.

    Returns
    -------
    list of (str, str, int)
        ``(panel title, expr as sent, number of series)`` per target, in layout order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluated = []
    for panel in graph_panels(dashboard):
        lines = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], dashboard, values)
            series = query_range(prometheus_url, expr, start, end, step)
            lines += [(legend(target.get("legendFormat", ""), each["metric"]), each["values"]) for each in series]
            evaluated.append((panel["title"], expr, len(series)))
        if lines:  # a panel without data gets no picture
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            draw(panel["title"], unit, lines, (start, end), out_dir / file_name(panel["title"]))
    return evaluated
