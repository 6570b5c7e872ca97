"""Benchmark helixflow against its anchors (helical's own code, or the naive approach), side by side.

Every measurement runs in a fresh subprocess, so peak memory (VmHWM) is that step's alone.
Results go to bench/results/latest.json and replace the generated section of
docs/benchmarks.md.

    python bench/run.py                # the figures in docs/benchmarks.md
    python bench/run.py --scale 0.1    # a quick smoke run with a tenth of the cells
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"
ARCHITECTURE = "gf-6L-10M-i2048"
N_GENES = 20_000  # genes in the datasets, all in the gf-6L-10M synthetic vocabulary

# Each snippet runs in its own interpreter: argv = [json args]; prints one JSON line.
SNIPPETS = {
    "split_helixflow": """
from helixflow.split import split_chunk
start = time.perf_counter()
split_chunk(a["data"], a["out"], a["cells"] - a["chunk"], a["cells"])
""",
    "split_naive": """
import anndata as ad
start = time.perf_counter()
ad.read_h5ad(a["data"])[a["cells"] - a["chunk"]:a["cells"]].copy().write_h5ad(a["out"])
""",
    "tokenize_helixflow": """
from helixflow.model_files import ModelFiles
from helixflow.tokenization import tokenize_chunk
start = time.perf_counter()
tokenize_chunk(a["data"], ModelFiles(Path(a["models"]), a["model"]), a["out"], threads=a["threads"])
""",
    "tokenize_helical": """
import anndata as ad
from helixflow.model_files import ModelFiles, helical_geneformer
geneformer = helical_geneformer(ModelFiles(Path(a["models"]), a["model"]))
start = time.perf_counter()  # imports and model loading are not tokenization
geneformer.process_data(ad.read_h5ad(a["data"]), gene_names="ensembl_id").save_to_disk(a["out"])
""",
    "embed_helixflow": """
import torch
from helixflow.embedding import embed_tokens, load_encoder
from helixflow.model_files import ModelFiles
from helixflow.tokenization import open_tokens
torch.set_num_threads(a["threads"])
files = ModelFiles(Path(a["models"]), a["model"])
model = load_encoder(files, torch.device("cpu"))
table = open_tokens(a["tokens"])
start = time.perf_counter()
out = embed_tokens(model, table.column("input_ids").combine_chunks(), table.column("length").to_numpy(),
                   a["batch"], False, torch.device("cpu"))
np.save(a["out"], out)
""",
    "embed_helical": """
import datasets, torch
from helixflow.model_files import ModelFiles, helical_geneformer
torch.set_num_threads(a["threads"])
geneformer = helical_geneformer(ModelFiles(Path(a["models"]), a["model"]), batch_size=a["batch"])
dataset = datasets.load_from_disk(a["tokens_dataset"])
start = time.perf_counter()
np.save(a["out"], geneformer.get_embeddings(dataset))
""",
}
# Each snippet sets `start` once its imports are done: seconds count the work alone.
PRELUDE = "import json, sys, time\nfrom pathlib import Path\nimport numpy as np\na = json.loads(sys.argv[1])\n"
EPILOGUE = """
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": round(hwm / 1024)}))
"""


def measure(name: str, **args) -> dict:
    result = subprocess.run([sys.executable, "-c", PRELUDE + SNIPPETS[name] + EPILOGUE, json.dumps(args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"  {name:<20} {figures['seconds']:8.2f} s  {figures['peak_rss_mb']:6d} MB  {json.dumps({k: v for k, v in args.items() if k in ('cells', 'batch')})}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every cell count (quick runs)")
    parser.add_argument("--threads", type=int, default=2, help="threads of helixflow's tokenize and of both embeds")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    from helixflow.demo_data import make_demo_dataset
    from helixflow.model_files import ModelFiles, stage_architecture
    from helixflow.tokenization import open_tokens

    size = lambda n: max(200, int(n * args.scale))  # noqa: E731
    split_sizes, tokenize_sizes, embed_cells, chunk = [size(50_000), size(200_000)], [size(10_000), size(40_000)], size(240), size(10_000)
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "scale": args.scale}
    with tempfile.TemporaryDirectory(prefix="helixflow-bench-") as scratch:
        work = Path(scratch)
        models = work / "models"
        stage_architecture(ModelFiles(models, ARCHITECTURE), ARCHITECTURE)
        common = {"models": str(models), "model": ARCHITECTURE}

        print("split: the last chunk of", chunk, "cells", flush=True)
        results["split"] = []
        for n in split_sizes:
            data = make_demo_dataset(work / f"split{n}.h5ad", n, n_genes=2_000, seed=n)
            row = {"cells": n, "chunk": chunk}
            for tool in ("helixflow", "naive"):
                row[tool] = measure(f"split_{tool}", data=str(data), out=str(work / f"s_{tool}.h5ad"), cells=n, chunk=chunk)
            results["split"].append(row)
            data.unlink()

        print("tokenize: .h5ad -> tokens", flush=True)
        results["tokenize"] = []
        for n in tokenize_sizes:
            data = make_demo_dataset(work / f"tok{n}.h5ad", n, n_genes=N_GENES, seed=n)
            row = {"cells": n}
            row["helixflow"] = measure("tokenize_helixflow", data=str(data), out=str(work / "t.arrow"), cells=n,
                                       threads=args.threads, **common)
            row["helical"] = measure("tokenize_helical", data=str(data), out=str(work / "t.dataset"), cells=n, **common)
            results["tokenize"].append(row)
            data.unlink()

        print("embed: cells of mixed lengths", flush=True)
        data = make_demo_dataset(work / "embed.h5ad", embed_cells, n_genes=N_GENES, mean_counts=1_500, seed=7)
        measure("tokenize_helixflow", data=str(data), out=str(work / "e.arrow"), threads=args.threads, **common)
        measure("tokenize_helical", data=str(data), out=str(work / "e.dataset"), **common)
        lengths = open_tokens(work / "e.arrow").column("length").to_numpy()
        row = {"cells": embed_cells, "batch": 16, "threads": args.threads,
               "length_min_median_max": [int(lengths.min()), int(sorted(lengths)[len(lengths) // 2]), int(lengths.max())]}
        for tool in ("helixflow", "helical"):
            row[tool] = measure(f"embed_{tool}", tokens=str(work / "e.arrow"), tokens_dataset=str(work / "e.dataset"),
                                out=str(work / f"emb_{tool}.npy"), cells=embed_cells, batch=16, threads=args.threads, **common)
        import numpy as np

        row["max_abs_difference"] = float(np.abs(np.load(work / "emb_helixflow.npy") - np.load(work / "emb_helical.npy")).max())
        results["embed"] = row

    out = ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_doc:
        write_doc(results, " ".join(["python", "bench/run.py", *sys.argv[1:]]))
    print(f"wrote {out}")


def write_doc(results: dict, command: str) -> None:
    """Replace the generated section of docs/benchmarks.md with these results."""
    lines = [f"Measured {results['date']} on {results['machine']}, torch {results['torch']}, with `{command}`.", ""]
    lines += ["**split** (last chunk of a dataset, peak RSS; anchor: read the whole file with anndata and slice):", "",
              "| cells in dataset | chunk | helixflow s | helixflow peak MB | naive s | naive peak MB |", "|---:|---:|---:|---:|---:|---:|"]
    for r in results["split"]:
        lines.append(f"| {r['cells']:,} | {r['chunk']:,} | {r['helixflow']['seconds']:.1f} | {r['helixflow']['peak_rss_mb']} | {r['naive']['seconds']:.1f} | {r['naive']['peak_rss_mb']} |")
    lines += ["", f"**tokenize** (.h5ad -> tokens, {N_GENES:,} genes, helixflow with {results['embed']['threads']} threads; anchor: `anndata.read_h5ad` + helical `Geneformer.process_data`):", "",
              "| cells | helixflow cells/s | helixflow peak MB | helical cells/s | helical peak MB | speed-up |", "|---:|---:|---:|---:|---:|---:|"]
    for r in results["tokenize"]:
        ours, theirs = r["cells"] / r["helixflow"]["seconds"], r["cells"] / r["helical"]["seconds"]
        lines.append(f"| {r['cells']:,} | {ours:,.0f} | {r['helixflow']['peak_rss_mb']} | {theirs:,.0f} | {r['helical']['peak_rss_mb']} | {ours / theirs:.1f}x |")
    e = results["embed"]
    ours, theirs = e["cells"] / e["helixflow"]["seconds"], e["cells"] / e["helical"]["seconds"]
    lines += ["", f"**embed** ({ARCHITECTURE} architecture, random weights, fp32 on CPU, {e['threads']} threads, batch {e['batch']}, "
              f"{e['cells']} cells of {e['length_min_median_max'][0]}/{e['length_min_median_max'][1]}/{e['length_min_median_max'][2]} "
              "(min/median/max) tokens; anchor: helical `Geneformer.get_embeddings`):", "",
              "| | cells/s | peak MB |", "|---|---:|---:|",
              f"| helixflow | {ours:.2f} | {e['helixflow']['peak_rss_mb']} |",
              f"| helical | {theirs:.2f} | {e['helical']['peak_rss_mb']} |",
              "", f"Speed-up {ours / theirs:.1f}x; largest difference between the two embeddings: {e['max_abs_difference']:.1e}."]
    replace_section(BEGIN, END, lines)


def replace_section(begin: str, end: str, lines: list[str]) -> None:
    """Put ``lines`` between the markers ``begin`` and ``end`` of docs/benchmarks.md (at its end if they are absent)."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = "\n".join([begin, *lines, end])
    if begin in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text += f"\n{section}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
