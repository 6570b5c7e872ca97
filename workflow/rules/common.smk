# Run-wide values computed once at parse time: the model profile, the chunks, the paths.
import json
import os

from helixflow.h5ad import chunk_bounds, inspect_h5ad
from helixflow.model_files import ModelFiles, model_facts
from helixflow.profiles import load_profile, step_resources

OUTDIR = config["outdir"].rstrip("/")
PROFILE = load_profile(config["model"], config["profiles_dir"])
MODEL_FILES = ModelFiles(
    f"{config['models_dir']}/{PROFILE['name']}", PROFILE["model_name"]
)
MODEL_READY = str(MODEL_FILES.model_dir / "config.json")
# Model files staged beforehand in a folder this run cannot write (a read-only container mount):
# stage_model then only records them, since staging again would fail.
MODEL_PRESTAGED = os.path.isfile(MODEL_READY) and not os.access(
    MODEL_FILES.model_dir, os.W_OK
)
# Reads only the file's header: a bad input fails here, before any output exists.
LAYOUT = inspect_h5ad(config["input"])
CHUNK_BOUNDS = {
    f"chunk-{index:05d}": bounds
    for index, bounds in enumerate(chunk_bounds(LAYOUT.n_cells, config["chunk_size"]))
}
CHUNKS = list(CHUNK_BOUNDS)
MODEL_ARGS = f"--models-dir {config['models_dir']} --profile {PROFILE['name']}" + (
    f" --profiles-dir {config['profiles_dir']}" if config["profiles_dir"] else ""
)
GENE_ARGS = f"--gene-id-column {config['gene_id_column']}" + (
    f" --gene-symbol-map {config['gene_symbol_map']}"
    if config["gene_symbol_map"]
    else ""
)


wildcard_constraints:
    chunk=r"chunk-\d{5}",


def chunk_cells(wildcards):
    start, stop = CHUNK_BOUNDS[wildcards.chunk]
    return stop - start


def resources_of(step, cells=config["chunk_size"]):
    """Snakemake threads/resources of a step, from the model profile."""
    return step_resources(PROFILE, step, min(cells, LAYOUT.n_cells))
