"""GPU benchmark of gf-12L-104M-i4096: bf16 embedding throughput, fine-tuning peak GPU memory with and without ZeRO offload.

Needs a CUDA GPU. The model is the real architecture with random weights (staged like a
real model); cells are synthetic token sequences with lengths spread over the model's
input size, as real cells' expressed-gene counts are. Each fine-tuning setting runs in
its own process so its GPU memory peak is its own. Run through ``bench/gpu.sh``, which
appends the results to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune_zero import write_section  # this folder
from helixflow import deepspeed_engine
from helixflow.classifier import build_classifier
from helixflow.embedding import embed_tokens, load_encoder
from helixflow.geneformer_models import model_facts
from helixflow.model_files import ModelFiles, stage_architecture
from helixflow.profiles import load_profile

MODEL = "gf-12L-104M-i4096"
SETTINGS = {
    "ZeRO-2, no offload": {"zero_stage": 2, "offload_optimizer": "none", "offload_params": "none"},
    "ZeRO-2, optimizer offloaded to CPU": {"zero_stage": 2, "offload_optimizer": "cpu", "offload_params": "none"},
    "ZeRO-3, parameters and optimizer offloaded to CPU": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
}
SECTION = f"## GPU: {MODEL} embedding throughput and fine-tuning memory"


def synthetic_cells(n_cells: int, vocabulary: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Token sequences framed by <cls>=2 ... <eos>=3, lengths uniform over 500..input size."""
    rng = np.random.default_rng(seed)
    input_size = model_facts(MODEL)["input_size"]
    lengths = rng.integers(500, input_size + 1, size=n_cells)
    cells = [np.concatenate([[2], rng.integers(4, vocabulary, size=n - 2), [3]]).astype(np.int32) for n in lengths]
    return cells, lengths


def staged_model(folder: str) -> ModelFiles:
    files = ModelFiles(Path(folder), MODEL)
    stage_architecture(files, MODEL, seed=0)
    return files


def embed_throughput(cells: int, batch_size: int) -> dict:
    """Cells per second of bf16 embedding on the GPU (after one warm-up batch)."""
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        model = load_encoder(staged_model(folder), device)
    tokens, lengths = synthetic_cells(cells, model.config.vocab_size)
    embed_tokens(model, tokens[:batch_size], lengths[:batch_size], batch_size=batch_size, special_tokens=True, device=device,
                 precision="bf16")
    torch.cuda.synchronize()
    started = time.perf_counter()
    embed_tokens(model, tokens, lengths, batch_size=batch_size, special_tokens=True, device=device, precision="bf16")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"cells": cells, "batch_size": batch_size, "seconds": seconds, "cells_per_s": cells / seconds,
            "mean_tokens": float(lengths.mean())}


def finetune_memory(setting: str, steps: int) -> dict:
    """Peak GPU memory and step time of fine-tuning with the profile's train settings and one ZeRO setting."""
    profile = load_profile(MODEL)
    train = {**profile["train"], **SETTINGS[setting], "gradient_accumulation": 1}
    device = torch.device("cuda")
    with tempfile.TemporaryDirectory() as folder:
        model = build_classifier(staged_model(folder), [f"class{i}" for i in range(6)], frozen_layers=train["frozen_layers"],
                                 seed=0)
    engine = deepspeed_engine.initialize(model, train, precision=profile["precision"], device=device, total_steps=steps)
    tokens, lengths = synthetic_cells(steps * train["batch_size"], model.config.vocab_size, seed=1)
    width = model_facts(MODEL)["input_size"]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        rows = range(step * train["batch_size"], (step + 1) * train["batch_size"])
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : lengths[row]] = torch.from_numpy(tokens[row].astype(np.int64))
            attention[i, : lengths[row]] = 1
        labels = torch.randint(0, 6, (len(rows),))
        torch.cuda.synchronize()
        started = time.perf_counter()
        logits = engine(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels.to(device))
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"setting": setting, "batch_size": train["batch_size"], "tokens_per_cell": width,
            "frozen_layers": train["frozen_layers"], "precision": profile["precision"],
            "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
            "median_step_s": float(np.median(times[1:] if len(times) > 1 else times))}


def report(embed: dict, finetunes: list[dict], command: str) -> str:
    gpu = torch.cuda.get_device_name(0)
    lines = [
        SECTION, "",
        f"{gpu}; {MODEL} architecture with random weights; synthetic cells of {embed['mean_tokens']:.0f} tokens on "
        "average (uniform between 500 and 4,096). Command:", "", "```bash", command, "```", "",
        f"Embedding (bf16, batch {embed['batch_size']}): **{embed['cells_per_s']:.1f} cells/s** "
        f"({embed['cells']} cells in {embed['seconds']:.1f} s).", "",
        f"Fine-tuning with the {MODEL} profile's train settings (bf16, batch {finetunes[0]['batch_size']} x "
        f"{finetunes[0]['tokens_per_cell']} tokens, {finetunes[0]['frozen_layers']} frozen layers):", "",
        "| ZeRO setting | peak GPU memory allocated (MB) | peak reserved (MB) | median step (s) |",
        "| --- | --- | --- | --- |",
    ]
    for result in finetunes:
        lines.append(f"| {result['setting']} | {result['peak_allocated_mb']:.0f} | {result['peak_reserved_mb']:.0f} | "
                     f"{result['median_step_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["embed", *SETTINGS], help="run one measurement in this process; print JSON")
    parser.add_argument("--cells", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible", file=sys.stderr)
        return 1
    if args.only == "embed":
        print(json.dumps(embed_throughput(args.cells, args.batch_size)))
        return 0
    if args.only:
        print(json.dumps(finetune_memory(args.only, args.steps)))
        return 0
    results = []
    for only in ["embed", *SETTINGS]:
        command = [sys.executable, __file__, "--only", only, "--cells", str(args.cells),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    section = report(results[0], results[1:], f"bench/gpu.sh --cells {args.cells} --batch-size {args.batch_size} --steps {args.steps}")
    write_section(section, heading=SECTION)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
