"""Benchmark helixflow against its anchors (helical's own code, or the naive approach), side by side.

Every measurement runs in a fresh subprocess, so peak memory (VmHWM) is that step's alone.
Results go to bench/results/latest.json (scGPT's to bench/results/scgpt.json) and replace
their generated section of docs/benchmarks.md.

    python bench/run.py                # the figures in docs/benchmarks.md
    python bench/run.py --scale 0.1    # a quick smoke run with a tenth of the cells
    nice python bench/run.py --family scgpt   # scGPT against helical (real architecture, random weights)
"""

from __future__ import annotations

import argparse
import json
import os
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
SCGPT_BEGIN, SCGPT_END = "<!-- bench/run.py --family scgpt: begin -->", "<!-- bench/run.py --family scgpt: end -->"
SCGPT_MEAN_COUNTS = 500  # UMIs per cell: about 100 to 1,100 genes expressed, the median near 400
SCGPT_ALONE_CELLS = 8  # cells helical embeds one at a time (its mean over a batch includes the padding)
SCGPT_EMBED_GOAL = 3.0  # issue 12: helixflow's embedding throughput over helical's
SCGPT_SIZE_FACTOR = 4  # helixflow's chunk is also measured at this many times the cells: is memory flat?

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
                   batch_size=a["batch"], special_tokens=False, device=torch.device("cpu"))
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
    # scGPT: helical's tokenization happens inside get_embeddings (its Dataset bins each cell, its
    # DataCollator pads and samples); with the transformer replaced by a stub, get_embeddings runs
    # exactly that and nothing of the model.
    "scgpt_tokenize_helical": """
import anndata as ad, torch
from helixflow.scgpt.files import ScGPTFiles, helical_scgpt
scgpt = helical_scgpt(ScGPTFiles(Path(a["models"])), batch_size=a["batch"])
scgpt.model._encode = lambda genes, values, **_: torch.ones(*genes.shape, 1)
start = time.perf_counter()
scgpt.get_embeddings(scgpt.process_data(ad.read_h5ad(a["data"]), gene_names="gene_symbol"))
""",
    "scgpt_embed_helical": """
import anndata as ad, torch
from helixflow.scgpt.files import ScGPTFiles, helical_scgpt
torch.set_num_threads(a["threads"])
scgpt = helical_scgpt(ScGPTFiles(Path(a["models"])), batch_size=a["batch"])
dataset = scgpt.process_data(ad.read_h5ad(a["data"])[:a["cells"]].copy(), gene_names="gene_symbol")
start = time.perf_counter()
np.save(a["out"], scgpt.get_embeddings(dataset))
""",
    # helixflow's steps through the scGPT family adapter, as `helixflow step tokenize|embed` call them.
    "scgpt_tokenize_helixflow": """
import helixflow.scgpt.tokenization  # the adapter imports it on first use: an import, not tokenization
from helixflow.families import SCGPT_MODEL_NAME, load_family
family = load_family(SCGPT_MODEL_NAME)
files = family.model_files(Path(a["models"]), SCGPT_MODEL_NAME)
start = time.perf_counter()
family.tokenize_chunk(Path(a["chunk"]), files, Path(a["out"]), gene_column="auto", symbol_map=None, threads=1,
                      progress=False)
""",
    "scgpt_embed_helixflow": """
import helical.models.scgpt.model_dir, helixflow.scgpt.embedding  # imported on first use, as above
from helixflow.families import SCGPT_MODEL_NAME, load_family
family = load_family(SCGPT_MODEL_NAME)
files = family.model_files(Path(a["models"]), SCGPT_MODEL_NAME)
start = time.perf_counter()  # loading the model is part of the step, so it counts here
family.embed_chunk(Path(a["tokens"]), Path(a["chunk"]), files, Path(a["out"]), batch_size=a["batch"], device="cpu",
                   precision="fp32", threads=a["threads"], progress=False, provenance=None)
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
    parser.add_argument("--family", choices=("geneformer", "scgpt"), default="geneformer", help="the models to benchmark")
    parser.add_argument("--scale", type=float, default=1.0, help="geneformer: multiply every cell count (quick runs)")
    parser.add_argument("--threads", type=int, default=2, help="threads of helixflow's tokenize and of both embeds")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--results", type=Path, help="where the figures go (default: bench/results/latest.json, "
                                                     "for scgpt bench/results/scgpt.json)")
    scgpt = parser.add_argument_group("scgpt")
    scgpt.add_argument("--cells", type=int, default=100, help="cells embedded by both; helixflow's chunk is also "
                                                              f"measured at {SCGPT_SIZE_FACTOR} times as many")
    scgpt.add_argument("--architecture", choices=("real", "tiny"), default="real", help="shape of the random model")
    scgpt.add_argument("--batch", type=int, default=24, help="cells per forward pass (helical's default: 24)")
    scgpt.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work",
                       help="where the staged model is kept between runs (datasets go to a temporary folder in it)")
    args = parser.parse_args()
    if args.family == "scgpt":
        results = scgpt_benchmark(args)
        out = args.results or ROOT / "bench" / "results" / "scgpt.json"
    else:
        results = geneformer_benchmark(args)
        out = args.results or ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_doc:
        command = " ".join(["python", "bench/run.py", *sys.argv[1:]])
        (write_scgpt_doc if args.family == "scgpt" else write_doc)(results, command)
    print(f"wrote {out}")


def run_facts() -> dict:
    """Machine, torch and date of this run."""
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def geneformer_benchmark(args: argparse.Namespace) -> dict:
    """Split, tokenize and embed (gf-6L-10M) by helixflow against the naive approach and helical."""
    from helixflow.demo_data import make_demo_dataset
    from helixflow.model_files import ModelFiles, stage_architecture
    from helixflow.tokenization import open_tokens

    size = lambda n: max(200, int(n * args.scale))  # noqa: E731
    split_sizes, tokenize_sizes, embed_cells, chunk = [size(50_000), size(200_000)], [size(10_000), size(40_000)], size(240), size(10_000)
    results = {**run_facts(), "scale": args.scale}
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
    return results


def scgpt_benchmark(args: argparse.Namespace) -> dict:
    """scGPT's tokenize and embed by helixflow and by helical on the same cells; helixflow's memory at two sizes.

    Returns the figures of :func:`measure` per step and tool, the speed-ups (helical's seconds
    over helixflow's), the largest difference from helical's embeddings of cells embedded one at
    a time, and helixflow's peak memory for a chunk of ``args.cells`` and of
    ``SCGPT_SIZE_FACTOR`` times as many cells.
    """
    import anndata as ad
    import numpy as np
    from helixflow.families import FAMILIES
    from helixflow.tokenization import open_tokens

    load_at_start = os.getloadavg()[0]
    files = stage_scgpt(args.workdir, args.architecture)
    architecture = files.load_architecture()
    results = {**run_facts(), "architecture": args.architecture,
               "shape": {key: architecture[key] for key in ("nlayers", "embsize", "nheads", "max_seq_len")},
               "vocabulary": len(files.load_vocabulary()), "cells": args.cells, "batch": args.batch, "threads": args.threads}
    settings = {"models": str(files.prefix), "batch": args.batch, "threads": args.threads}
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scgpt-", dir=args.workdir) as scratch:
        work = Path(scratch)
        print(f"scgpt: {args.cells} cells, helixflow and helical", flush=True)
        data, chunk = scgpt_cells(work, files, args.cells)
        ours = helixflow_scgpt(work, chunk, settings, args.cells)
        lengths = open_tokens(work / f"tokens-{args.cells}.arrow").column("length").to_numpy()
        results["length_min_median_max"] = [int(lengths.min()), int(np.median(lengths)), int(lengths.max())]
        theirs = {"tokenize": measure("scgpt_tokenize_helical", data=str(data), cells=args.cells, **settings),
                  "embed": measure("scgpt_embed_helical", data=str(data), out=str(work / "helical.npy"), cells=args.cells,
                                   **settings)}
        for step in ("tokenize", "embed"):
            results[step] = {"helixflow": ours[step], "helical": theirs[step],
                             "speed_up": theirs[step]["seconds"] / ours[step]["seconds"]}

        alone = min(SCGPT_ALONE_CELLS, args.cells)
        measure("scgpt_embed_helical", data=str(data), out=str(work / "alone.npy"), cells=alone,
                **{**settings, "batch": 1})
        embedded = ad.read_h5ad(work / f"embedded-{args.cells}.h5ad").obsm[FAMILIES["scgpt"].embedding_key]
        results["alone_cells"] = alone
        results["max_abs_difference"] = float(np.abs(embedded[:alone] - np.load(work / "alone.npy")).max())

        large = SCGPT_SIZE_FACTOR * args.cells
        print(f"scgpt: helixflow's chunk of {large} cells", flush=True)
        results["memory"] = [{"cells": args.cells, **peaks(ours)},
                             {"cells": large, **peaks(helixflow_scgpt(work, scgpt_cells(work, files, large)[1], settings, large))}]
    results["load_average"] = [round(load_at_start, 1), round(os.getloadavg()[0], 1)]
    return results


def stage_scgpt(workdir: Path, architecture: str):
    """The random scGPT model of ``architecture`` kept under ``workdir``: staged by the first run, reused after."""
    from helixflow.scgpt.files import ScGPTFiles, stage_synthetic

    files = ScGPTFiles(workdir / f"scgpt-{architecture}")
    if not files.ready_file.is_file():  # staging writes the model folder whole or not at all
        stage_synthetic(files, architecture=architecture)
    return files


def scgpt_cells(work: Path, files, n_cells: int) -> tuple[Path, Path]:
    """A dataset of ``n_cells`` with genes of the staged vocabulary (``var['gene_symbol']``), and its chunk as split writes it."""
    from helixflow.demo_data import make_demo_dataset
    from helixflow.scgpt.files import SPECIAL_TOKENS
    from helixflow.split import split_chunk

    n_genes = min(N_GENES, len(files.load_vocabulary()) - len(SPECIAL_TOKENS))
    data = make_demo_dataset(work / f"cells-{n_cells}.h5ad", n_cells, n_genes=n_genes, mean_counts=SCGPT_MEAN_COUNTS,
                             seed=n_cells)
    return data, split_chunk(data, work / f"chunk-{n_cells}.h5ad", 0, n_cells)


def helixflow_scgpt(work: Path, chunk: Path, settings: dict, n_cells: int) -> dict:
    """Figures of helixflow's scGPT tokenize and embed steps on one chunk (tokens and embeddings stay in ``work``)."""
    tokens = work / f"tokens-{n_cells}.arrow"
    return {"tokenize": measure("scgpt_tokenize_helixflow", chunk=str(chunk), out=str(tokens), cells=n_cells, **settings),
            "embed": measure("scgpt_embed_helixflow", tokens=str(tokens), chunk=str(chunk), cells=n_cells,
                             out=str(work / f"embedded-{n_cells}.h5ad"), **settings)}


def peaks(figures: dict) -> dict:
    """Peak RSS (MB) of each step in ``figures``."""
    return {f"{step}_peak_rss_mb": figures[step]["peak_rss_mb"] for step in figures}


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


def write_scgpt_doc(results: dict, command: str) -> None:
    """Replace the generated scGPT section of docs/benchmarks.md with these results."""
    shape, lengths = results["shape"], results["length_min_median_max"]
    lines = [f"Measured {results['date']} on {results['machine']}, torch {results['torch']}, with `{command}`; "
             f"1-minute load average {results['load_average'][0]} at the start and {results['load_average'][1]} at the "
             "end (other jobs shared the cores).", "",
             f"**scGPT** ({results['architecture']} architecture: {shape['nlayers']} layers, embsize {shape['embsize']}, "
             f"{shape['nheads']} heads, vocabulary {results['vocabulary']:,}; random weights, fp32 on CPU, "
             f"{results['threads']} threads, batch {results['batch']}; {results['cells']} cells of "
             f"{lengths[0]}/{lengths[1]}/{lengths[2]} (min/median/max) tokens):", "",
             "| step | helixflow cells/s | helixflow peak MB | helical cells/s | helical peak MB | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for step in ("tokenize", "embed"):
        ours, theirs = (results[step][tool] for tool in ("helixflow", "helical"))
        lines.append(f"| {step} | {results['cells'] / ours['seconds']:,.2f} | {ours['peak_rss_mb']} | "
                     f"{results['cells'] / theirs['seconds']:,.2f} | {theirs['peak_rss_mb']} | {results[step]['speed_up']:.1f}x |")
    speed_up = results["embed"]["speed_up"]
    lines += ["", f"Embedding goal, at least {SCGPT_EMBED_GOAL:.0f}x helical's throughput: "
              f"{'met' if speed_up >= SCGPT_EMBED_GOAL else 'not met'} ({speed_up:.1f}x). Largest difference from helical's "
              f"embeddings of the first {results['alone_cells']} cells, each embedded alone (batch size 1): "
              f"{results['max_abs_difference']:.1e}.", "",
              "helixflow's peak memory per chunk:", "",
              "| cells in the chunk | tokenize peak MB | embed peak MB |", "|---:|---:|---:|"]
    lines += [f"| {row['cells']:,} | {row['tokenize_peak_rss_mb']} | {row['embed_peak_rss_mb']} |" for row in results["memory"]]
    replace_section(SCGPT_BEGIN, SCGPT_END, lines)


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
