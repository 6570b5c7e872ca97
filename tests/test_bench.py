"""bench/run.py's scGPT mode runs end to end at a tiny size (its figures are never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helixflow
from conftest import PROJECT_DIR

FIGURES = {"seconds", "peak_rss_mb"}


@pytest.mark.slow  # seven interpreters, each importing torch and helical: about two minutes on two idle cores
def test_scgpt_benchmark_writes_every_figure_and_matches_helical(tmp_path):
    """helixflow and helical on the same cells, side by side: every figure present, embeddings equal within 1e-4."""
    results = tmp_path / "scgpt.json"
    environment = dict(os.environ, PYTHONPATH=str(Path(helixflow.__file__).parents[1]))
    subprocess.run([sys.executable, str(PROJECT_DIR / "bench" / "run.py"), "--family", "scgpt", "--architecture", "tiny",
                    "--cells", "16", "--workdir", str(tmp_path / "work"), "--results", str(results), "--no-doc"],
                   check=True, env=environment)
    figures = json.loads(results.read_text())
    for step in ("tokenize", "embed"):
        assert set(figures[step]["helixflow"]) == set(figures[step]["helical"]) == FIGURES
        assert figures[step]["speed_up"] > 0
    assert figures["alone_cells"] == 8 and figures["max_abs_difference"] < 1e-4
    assert [row["cells"] for row in figures["memory"]] == [16, 64]
    assert all(row["tokenize_peak_rss_mb"] > 0 and row["embed_peak_rss_mb"] > 0 for row in figures["memory"])
    assert figures["shape"]["embsize"] == 32 and len(figures["load_average"]) == 2
