"""Peak memory of split and tokenize stays flat as the dataset grows (measured in subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helixflow.demo_data import make_demo_dataset

MEASURE = """
import sys
from pathlib import Path
from helixflow.model_files import ModelFiles
from helixflow.split import split_chunk
from helixflow.tokenization import tokenize_chunk
step, source, out, n, prefix = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if step == "split":  # the last chunk of 10,000 cells, as the workflow's last split job
    split_chunk(source, out, n - 10_000, n)
else:
    tokenize_chunk(source, ModelFiles(Path(prefix), "gf-6L-10M-i2048"), out)
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's pytest process.
print(next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_mb(step: str, source, out, n_cells: int, prefix) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, step, str(source), str(out), str(n_cells), str(prefix)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sizes")
    return {n: make_demo_dataset(folder / f"cells{n}.h5ad", n, seed=n) for n in (12_000, 48_000)}


@pytest.mark.parametrize("step", ["split", "tokenize"])
def test_peak_memory_is_flat(step, two_sizes, tiny_v1, tmp_path):
    peaks = {}
    for n, source in two_sizes.items():
        out = tmp_path / f"{step}{n}.{'h5ad' if step == 'split' else 'arrow'}"
        peaks[n] = peak_rss_mb(step, source, out, n, tiny_v1.prefix)
    # 4x the cells holds about 120 MB more counts; a flat step grows by far less than that.
    # (split works on a fixed chunk, as each workflow job does; tokenize on the whole file.)
    assert peaks[48_000] <= peaks[12_000] + 40, peaks
    assert peaks[48_000] <= 512, peaks
