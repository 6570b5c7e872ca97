"""The failing step's own error, read from its log, so a failed run ends by saying what failed.

Every step runs as ``helixflow step ...`` with its output in ``OUTDIR/logs/...``; a step that
stops on a user's file or setting writes ``helixflow: error: <file>: <problem>`` there, and any
other failure ends its log with a traceback.
"""

from __future__ import annotations

from pathlib import Path

ERROR_PREFIX = "helixflow: error: "


def failed_step_error(outdir: str | Path, since: float) -> str | None:
    """The error line of the most recently written step log holding one, or ``None``.

    Parameters
    ----------
    outdir
        The run's output folder (its logs are under ``logs/``).
    since
        Only logs written at or after this time (``time.time()``) count: older ones belong to
        earlier runs.

    Returns
    -------
    str or None
        ``helixflow: error: <file>: <problem> (step log: <path>)``; for an unexpected exception,
        the traceback's last line in that form.
    """
    logs = [(log.stat().st_mtime, log) for log in Path(outdir, "logs").rglob("*.log") if log.stat().st_mtime >= since]
    for _, log in sorted(logs, key=lambda item: item[0], reverse=True):
        lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
        if errors:
            return f"{errors[-1]} (step log: {log})"
        if any(line.startswith("Traceback") for line in lines):
            return f"{ERROR_PREFIX}{log.relative_to(Path(outdir, 'logs')).with_suffix('')}: {lines[-1]} (step log: {log})"
    return None
