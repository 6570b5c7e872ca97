"""Peak memory of every step stays flat as the dataset grows (measured in subprocesses)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import PROJECT_DIR
from helixflow.profiles import load_profile


def load_bench():
    """bench/memory.py, the harness that also produces the 1M/10M figures of docs/benchmarks.md."""
    spec = importlib.util.spec_from_file_location("bench_memory", PROJECT_DIR / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BENCH = load_bench()
# The one-million-cell variant, with the same factor ten as one to ten million cells (whose
# figures bench/memory.py writes into docs/benchmarks.md): about 9 minutes on the 2-core CI machine,
# most of it annotate running the model over every cell.
SIZES = (100_000, 1_000_000)


@pytest.fixture(scope="module")
def every_step(models_dir, tmp_path_factory):
    """Peak RSS of every step at both sizes, each step in its own process, chunks of 10,000 cells."""
    root = tmp_path_factory.mktemp("every-step")
    return {n: BENCH.measure(BENCH.prepare(root / f"cells-{n}", n, models_dir), plot_cells=5_000) for n in SIZES}


@pytest.mark.parametrize("step", BENCH.STEPS)
def test_every_steps_memory_is_set_by_its_chunk_not_the_dataset(step, every_step):
    small, large = (every_step[n][step]["peak_rss_mb"] for n in SIZES)
    # Ten times the cells: a bounded step stays within 20% (the goal), and under 1 GB. The two
    # steps that keep numbers per cell may grow by what their profile adds per million cells, no more.
    per_million = load_profile("tiny")["memory_mb_per_million_cells"].get(step.split()[0], 0)
    assert large <= 1.2 * small + per_million * (SIZES[1] - SIZES[0]) / 1_000_000, every_step
    assert large <= 1024, every_step
