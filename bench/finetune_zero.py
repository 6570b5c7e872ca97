"""Fine-tuning step time and peak host memory: DeepSpeed ZeRO with CPU offload against plain torch AdamW.

Each mode trains the same classifier (the gf-6L-10M-i2048 architecture with random
weights, staged like a real model) on the same synthetic batches from the same seed, in
its own process so that peak memory is its own:

- ``torch``: plain PyTorch, ``torch.optim.AdamW``, the same gradient clipping and
  learning-rate schedule as helixflow's DeepSpeed configuration;
- ``zero2``: helixflow's DeepSpeed engine, ZeRO-2, optimizer state offloaded to CPU
  (DeepSpeed's CPU Adam);
- ``zero3``: ZeRO-3, parameters and optimizer state offloaded to CPU.

All in fp32, so the loss curves should agree up to the optimizers' rounding. Run:

    python bench/finetune_zero.py                 # all modes; writes the Fine-tuning section of docs/benchmarks.md
    python bench/finetune_zero.py --mode zero2    # one mode; prints its JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from helixflow import deepspeed_engine
from helixflow.classifier import build_classifier
from helixflow.model_files import ModelFiles, stage_architecture

ARCHITECTURE = "gf-6L-10M-i2048"
MODES = {
    "torch": None,
    "zero2": {"zero_stage": 2, "offload_optimizer": "cpu", "offload_params": "none"},
    "zero3": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
NOTE = ("In one CPU process, offloading saves no memory: the optimizer state (and, with ZeRO-3, the "
        "parameters) stays in host memory either way. The extra host memory is DeepSpeed's own: its "
        "runtime, the fp32 master copy of the parameters its optimizer steps, and gradient buffers. "
        "Offloading pays where it moves state out of GPU memory (bench/gpu.sh measures that).")
SECTION = "## Fine-tuning: DeepSpeed ZeRO offload against plain PyTorch on CPU"


def synthetic_batches(n_batches: int, batch_size: int, length: int, vocabulary: int, n_classes: int, seed: int):
    """Fixed random token sequences (full length, no padding) and labels."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(4, vocabulary, (batch_size, length), generator=generator),
             torch.randint(0, n_classes, (batch_size,), generator=generator)) for _ in range(n_batches)]


def run_mode(mode: str, args) -> dict:
    """Train ``args.warmup + args.steps`` steps in this process; return losses, step times and peak RSS."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as staging:
        files = ModelFiles(Path(staging), ARCHITECTURE)
        stage_architecture(files, ARCHITECTURE, seed=0)
        model = build_classifier(files, [f"class{i}" for i in range(6)], frozen_layers=0, seed=0)
    vocabulary = model.config.vocab_size
    total = args.warmup + args.steps
    train = {"batch_size": args.batch_size, "gradient_accumulation": 1, "learning_rate": args.learning_rate,
             "offload_optimizer": "none", "offload_params": "none", **(MODES[mode] or {})}
    if MODES[mode] is None:
        step = torch_trainer(model, train, total)
    else:
        engine = deepspeed_engine.initialize(model, train, precision="fp32", device=torch.device("cpu"), total_steps=total)
        step = deepspeed_trainer(engine)
    batches = synthetic_batches(total, args.batch_size, args.length, vocabulary, 6, seed=1)
    torch.manual_seed(2)  # the same dropout masks in every mode
    losses, seconds = [], []
    for ids, labels in batches:
        started = time.perf_counter()
        losses.append(step(ids, labels))
        seconds.append(time.perf_counter() - started)
    return {"mode": mode, "losses": losses, "step_seconds": seconds[args.warmup:],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": sum(p.numel() for p in model.parameters()) if MODES[mode] is None else None}


def torch_trainer(model, train: dict, total_steps: int):
    """One plain-PyTorch training step: AdamW, clipping and schedule as in helixflow's DeepSpeed config."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **{**deepspeed_engine.ADAMW, "lr": train["learning_rate"]})
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, deepspeed_engine.warmup_decay(total_steps))

    def step(ids, labels) -> float:
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), deepspeed_engine.GRADIENT_CLIPPING)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def deepspeed_trainer(engine):
    """One step of helixflow's DeepSpeed engine."""
    engine.train()

    def step(ids, labels) -> float:
        loss = torch.nn.functional.cross_entropy(engine(input_ids=ids).logits, labels)
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def compare(results: dict[str, dict], args) -> str:
    """The Markdown section: a table per mode and the loss-curve agreement."""
    baseline = results["torch"]
    base_time = float(np.median(baseline["step_seconds"]))
    lines = [
        SECTION, "",
        f"{ARCHITECTURE} architecture (random weights, {baseline['parameters'] / 1e6:.1f}M parameters) as a 6-class "
        f"classifier, fp32, batches of {args.batch_size} cells x {args.length} tokens, torch threads: {args.threads}, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps; each mode in its own process, run "
        f"{args.repeats} times in turn, the run with the fastest median step reported (the machine is shared). "
        f"Machine: {cpu_name()}, {os.cpu_count()} cores. Command:", "",
        "```bash",
        f"python bench/finetune_zero.py --steps {args.steps} --warmup {args.warmup} --batch-size {args.batch_size} "
        f"--length {args.length} --threads {args.threads} --repeats {args.repeats}",
        "```", "",
        "| mode | median step (s) | vs torch AdamW | peak host RSS (MB) | max abs loss difference vs torch |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {"torch": "plain torch AdamW", "zero2": "ZeRO-2, optimizer offloaded to CPU",
             "zero3": "ZeRO-3, parameters and optimizer offloaded to CPU"}
    for mode, result in results.items():
        median = float(np.median(result["step_seconds"]))
        difference = float(np.max(np.abs(np.subtract(result["losses"], baseline["losses"]))))
        lines.append(f"| {names[mode]} | {median:.3f} | {median / base_time:.2f}x | {result['peak_rss_mb']:.0f} | "
                     f"{difference:.2e} |")
    lines += ["", NOTE, "", "Loss per step (all steps, warm-up included):", "", "| step | " + " | ".join(results) + " |",
              "| --- |" + " --- |" * len(results)]
    for index in range(len(baseline["losses"])):
        lines.append(f"| {index + 1} | " + " | ".join(f"{result['losses'][index]:.5f}" for result in results.values()) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def write_section(section: str, heading: str = SECTION, path: Path = DOCS) -> None:
    """Replace (or append) the section under ``heading`` of docs/benchmarks.md, leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if heading in text:
        start = text.index(heading)
        following = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[following + 1:] if following != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process and print its JSON")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode; the fastest is reported")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return 0
    modes = ["torch", *[m for m in args.modes if m != "torch"]]
    runs = {mode: [] for mode in modes}
    for repeat in range(args.repeats):  # round robin, so a busy moment on the machine hits every mode alike
        for mode in modes:
            command = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1]))
            print(f"{mode} (run {repeat + 1}): median step {np.median(runs[mode][-1]['step_seconds']):.3f} s, "
                  f"peak RSS {runs[mode][-1]['peak_rss_mb']:.0f} MB", flush=True)
    results = {mode: min(mode_runs, key=lambda run: np.median(run["step_seconds"])) for mode, mode_runs in runs.items()}
    section = compare(results, args)
    write_section(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
