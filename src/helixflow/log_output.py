"""Where helixflow's log records are shown, and how they read: ``helixflow: MESSAGE`` on stderr.

Library modules log through ``logging.getLogger(__name__)`` and configure nothing; the programs
that use them (the command line, the workflow's snakemake process) choose what is shown here.
"""

from __future__ import annotations

import logging
import sys

LINE_FORMAT = "helixflow: %(message)s"


def show_all_logs(*, level: int = logging.INFO) -> None:
    """Show every logger's records at ``level`` and above on stderr (a step's log: helixflow's,
    helical's, DeepSpeed's); a no-op where logging is configured already."""
    logging.basicConfig(level=level, format=LINE_FORMAT, stream=sys.stderr)


def show_logs_of(logger_name: str, *, level: int = logging.INFO) -> None:
    """Show the records of one logger (and its children) at ``level`` and above on stderr,
    leaving every other logger as it is.

    Parameters
    ----------
    logger_name
        E.g. ``helixflow.object_storage``, or ``helixflow`` for all of helixflow's modules.
    level
        The lowest level shown.
    """
    logger = logging.getLogger(logger_name)
    logger.setLevel(level)
    if not logger.handlers:  # called again in one process: one handler, no repeated lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
        logger.addHandler(handler)
