"""The ``helixflow`` command line: its parser and entry point.

The commands live in three modules: :mod:`helixflow.cli.front_door` (what a user starts a job
with: ``run``, ``annotate``, ``demo-data``), :mod:`helixflow.cli.model_commands` (``info``,
``model``, ``profile``) and :mod:`helixflow.cli.step_commands` (``step ...``, what the
workflow's rules call); :mod:`helixflow.cli.shared` holds what more than one of them uses.
"""

from __future__ import annotations

import argparse
import signal
import sys

from helixflow.cli import front_door, model_commands, step_commands
from helixflow.errors import HelixflowError
from helixflow.log_output import show_all_logs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after a bare '--' goes to snakemake untouched.
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.snakemake_args = passthrough
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        if getattr(args, "metrics_step", None):
            return _run_measured_step(args)
        return args.handler(args) or 0
    except HelixflowError as error:
        print(f"helixflow: error: {error.path}: {error.problem}", file=sys.stderr)
        return error.exit_code


def _run_measured_step(args) -> int:
    """A workflow step: its handler returns the cells it processed; helixflow.metrics reports the rest."""
    from helixflow.metrics import step_metrics

    show_all_logs()  # the step's log
    # SIGTERM (a stopped run) ends the step like an error: atomic outputs remove their partial files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with step_metrics(args.metrics_step, getattr(args, "chunk_name", None) or "all") as record:
        record.cells = args.handler(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="helixflow",
        description="Run Geneformer or scGPT (through helical) over .h5ad datasets of any size as a Snakemake workflow.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")
    # In the order `helixflow --help` lists them.
    front_door.add_run_command(commands)
    model_commands.add_info_command(commands)
    model_commands.add_model_commands(commands)
    model_commands.add_profile_commands(commands)
    front_door.add_annotate_command(commands)
    front_door.add_demo_data_command(commands)
    step_commands.add_step_commands(commands)
    return parser
