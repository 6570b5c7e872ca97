"""What more than one group of commands uses: common options, and the model files a profile names."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_gene_args(parser: argparse.ArgumentParser) -> None:
    """Options that say where a dataset's gene ids are (``annotate`` and the steps that read genes)."""
    parser.add_argument("--gene-id-column", default="auto", help="var column with gene ids or symbols, 'index' or 'auto'")
    parser.add_argument("--gene-symbol-map", type=Path, help="two-column table: gene symbol, Ensembl id")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """Options of a fine-tuned model's inference (``annotate`` and ``step evaluate``)."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda; default: auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int)


def profile_and_files(args):
    """The profile named by ``--profile``, and its model's staged files."""
    from helixflow.profiles import load_profile

    profile = load_profile(args.profile, args.profiles_dir)
    return profile, staged_files(profile, args.models_dir)


def staged_files(profile: dict, models_dir: Path):
    """Where a profile's model is staged under ``models_dir``: its family's model files."""
    from helixflow.families import load_family

    return load_family(profile["model_name"]).model_files(Path(models_dir) / profile["name"], profile["model_name"])


def symbol_map(args):
    """The ``--gene-symbol-map`` table (gene symbol to Ensembl id), or ``None`` without one."""
    from helixflow.tokenization import read_symbol_map

    return read_symbol_map(args.gene_symbol_map) if args.gene_symbol_map else None

