"""The report steps: a 2-D map of the embeddings, and the per-job trace of the whole run."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helixflow.embedding import embedding_key
from helixflow.errors import HelixflowError
from helixflow.h5ad import read_obs_column, read_rows
from helixflow.metrics import read_records
from helixflow.outputs import atomic_path

# Columns after Nextflow's execution trace, so nf-core habits carry over.
TRACE_COLUMNS = ["task_id", "name", "process", "tag", "status", "realtime_s", "cpu_percent",
                 "peak_rss_mb", "peak_vmem_mb", "read_mb", "write_mb", "cells", "cells_per_s", "peak_gpu_mb"]


def plot_embedding_map(
    h5ad: str | Path, out_png: str | Path, out_json: str | Path, *,
    label: str | None = None, max_cells: int = 20_000, seed: int = 0,
) -> dict:
    """Draw a UMAP of (a random subsample of) the embeddings, coloured by ``label``.

    Without ``label`` (unlabelled data) the map is coloured by k-means clusters of the
    embeddings (:func:`embedding_clusters`). Also writes a JSON summary: cells, cells without
    embedding, what colours the map, and the silhouette score of ``label`` in embedding space
    (how well the embeddings separate the labels).
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    with h5py.File(h5ad, "r") as handle:
        key = embedding_key(handle)  # the model family's
        stored = handle["obsm"][key]
        n_cells = stored.shape[0]
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n_cells, size=min(n_cells, max_cells), replace=False))
        embeddings = read_rows(stored, rows)  # only the sampled cells are read
        labels = None
        if label:
            columns = list(handle["obs"].attrs["column-order"])
            if label not in columns:
                raise HelixflowError(h5ad, f"no obs column '{label}' to colour by (columns: {', '.join(columns)})")
            labels = read_obs_column(handle, label, rows)
    finite = np.isfinite(embeddings).all(axis=1)
    sample = ad.AnnData(obsm={key: embeddings[finite]})
    sample.obs_names = [str(r) for r in rows[finite]]
    if labels is not None:
        colour, colour_title = label, label
        sample.obs[label] = pd.Categorical(labels[finite].astype(str))
    else:
        colour, clusters = "cluster", embedding_clusters(sample.obsm[key], seed=seed)
        colour_title = f"k-means cluster (k={clusters.categories.size})"
        sample.obs[colour] = clusters
    # Exact neighbours (sklearn): cheap for max_cells cells, and past 4,096 cells scanpy 1.11's default
    # (pynndescent) hands scipy 1.17 a csr_array that its neighbour shortcut cannot read (no getnnz).
    sc.pp.neighbors(sample, use_rep=key, n_neighbors=min(15, max(2, sample.n_obs - 1)), random_state=seed,
                    transformer="sklearn")
    sc.tl.umap(sample, random_state=seed)

    summary = {"cells": int(n_cells), "cells_plotted": int(finite.sum()), "cells_without_embedding_in_sample": int((~finite).sum()),
               "coloured_by": label if labels is not None else f"{colour_title} of the embeddings (no labels)"}
    if labels is not None and sample.obs[label].nunique() > 1:
        scored = min(sample.n_obs, 5_000)
        points, truth = sample.obsm[key][:scored], sample.obs[label].to_numpy()[:scored]
        summary["silhouette"] = float(silhouette_score(points, truth))
        # Share of cells whose 15 nearest neighbours vote for their own label (3-fold CV).
        folds = min(3, int(pd.Series(truth).value_counts().min()))
        if folds >= 2:
            summary["knn_label_accuracy"] = float(cross_val_score(KNeighborsClassifier(15), points, truth, cv=folds).mean())
    figure, axes = plt.subplots(figsize=(7, 6))
    coords = sample.obsm["X_umap"]
    for name in sample.obs[colour].cat.categories:
        mask = (sample.obs[colour] == name).to_numpy()
        axes.scatter(coords[mask, 0], coords[mask, 1], s=4, label=name)
    axes.legend(markerscale=3, fontsize=8, title=colour_title, loc="best")
    title = f"Geneformer embeddings, {summary['cells_plotted']:,} of {n_cells:,} cells"
    if labels is None:
        title += "\nno cell labels: coloured by k-means clusters of the embeddings"
    if "knn_label_accuracy" in summary:
        title += f"\n{label} of 15 nearest neighbours agrees for {summary['knn_label_accuracy']:.0%} of cells"
    axes.set(title=title, xlabel="UMAP 1", ylabel="UMAP 2", xticks=[], yticks=[])
    with atomic_path(out_png) as partial:
        figure.savefig(partial, dpi=120, bbox_inches="tight", format="png")
    plt.close(figure)
    with atomic_path(out_json) as partial:
        partial.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def embedding_clusters(points: np.ndarray, *, seed: int = 0, max_clusters: int = 10, scored: int = 5_000) -> pd.Categorical:
    """k-means clusters of embeddings, the number of clusters chosen by silhouette score.

    k runs from 2 to ``max_clusters``; each k is scored on the first ``scored`` points (the
    sample is already random). Fewer than 3 points make one cluster.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if len(points) < 3:
        return pd.Categorical(["1"] * len(points))
    best_score, best = -2.0, np.zeros(len(points), dtype=int)
    for k in range(2, min(max_clusters, len(points) - 1) + 1):
        assigned = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(points)
        if len(np.unique(assigned[:scored])) < 2:
            continue
        score = silhouette_score(points[:scored], assigned[:scored])
        if score > best_score:
            best_score, best = score, assigned
    names = [str(code + 1) for code in best]
    return pd.Categorical(names, categories=sorted(set(names), key=int))


def collect_trace(benchmarks_dir: str | Path, metrics_dir: str | Path) -> pd.DataFrame:
    """One row per finished job: Snakemake's benchmark files (``<rule>/<tag>.tsv``) for time, memory
    and I/O, the step's own metrics record (helixflow.metrics) for cells and GPU memory."""
    records = read_records(metrics_dir)
    rows = []
    for path in sorted(Path(benchmarks_dir).glob("*/*.tsv")):
        bench = pd.read_csv(path, sep="\t").iloc[-1]  # a repeated benchmark keeps its last run
        process, tag = path.parent.name, path.stem
        record = records.get((process, tag), {})
        cells = record.get("cells", 0)
        gpu_bytes = record.get("peak_gpu_memory_bytes")
        seconds = float(bench["s"])
        rows.append({
            "name": f"{process} ({tag})", "process": process, "tag": tag, "status": "COMPLETED",
            "realtime_s": round(seconds, 3),
            "cpu_percent": round(100 * float(bench.get("cpu_time", 0) or 0) / seconds, 1) if seconds else 0.0,
            "peak_rss_mb": _number(bench.get("max_rss")), "peak_vmem_mb": _number(bench.get("max_vms")),
            "read_mb": _number(bench.get("io_in")), "write_mb": _number(bench.get("io_out")),
            "cells": cells, "cells_per_s": round(cells / seconds, 1) if cells and seconds else None,
            "peak_gpu_mb": round(gpu_bytes / 2**20, 1) if gpu_bytes is not None else None,
        })
    table = pd.DataFrame(rows, columns=TRACE_COLUMNS[1:])
    table.insert(0, "task_id", range(1, len(table) + 1))
    return table


def _number(value) -> float | None:
    try:
        return round(float(value), 2)
    except (TypeError, ValueError):
        return None  # Snakemake writes "NA" where it could not measure


def write_trace(benchmarks_dir: str | Path, metrics_dir: str | Path, out_tsv: str | Path,
                out_png: str | Path) -> pd.DataFrame:
    """Write the trace TSV and a plot of wall time, peak memory and throughput per step."""
    table = collect_trace(benchmarks_dir, metrics_dir)
    per_step = table.groupby("process", sort=False).agg(
        realtime_s=("realtime_s", "sum"), peak_rss_mb=("peak_rss_mb", "max"), cells=("cells", "sum"))
    per_step["cells_per_s"] = per_step["cells"] / per_step["realtime_s"]
    figure, (time_axes, memory_axes, rate_axes) = plt.subplots(1, 3, figsize=(15, 4))
    per_step["realtime_s"].plot.barh(ax=time_axes, color="tab:blue", title="Wall time, all jobs (s)")
    per_step["peak_rss_mb"].plot.barh(ax=memory_axes, color="tab:orange", title="Peak memory of one job (MB)")
    per_step["cells_per_s"].plot.barh(ax=rate_axes, color="tab:green", title="Cells per second of job wall time")
    for axes in (memory_axes, rate_axes):
        axes.set_ylabel("")
    figure.tight_layout()
    with atomic_path(out_png) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)
    with atomic_path(out_tsv) as partial:
        table.to_csv(partial, sep="\t", index=False)
    return table
