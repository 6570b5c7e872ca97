"""``helixflow step ...``: one workflow step each, as the rules of workflow/rules/*.smk call them."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from helixflow.cli.shared import add_gene_args, add_inference_args, profile_and_files, symbol_map


def add_step_commands(commands: argparse._SubParsersAction) -> None:
    """``helixflow step STEP``: the per-step commands."""
    steps = commands.add_parser("step", help="run one workflow step (what the workflow's rules call)").add_subparsers(metavar="STEP")

    validate = steps.add_parser("validate", help="check a dataset against a model; write a JSON summary")
    validate.add_argument("input", type=Path)
    validate.add_argument("out", type=Path)
    _add_model_args(validate)
    add_gene_args(validate)
    raw = validate.add_mutually_exclusive_group()
    raw.add_argument("--require-raw-counts", dest="raw", action="store_true", default=True)
    raw.add_argument("--allow-any-values", dest="raw", action="store_false")
    validate.add_argument("--counts-source", default="auto", help="X, raw, layers/NAME or auto")
    validate.add_argument("--label-column", help="obs column of labels (its presence is reported)")
    validate.set_defaults(handler=cmd_step_validate, metrics_step="validate_input")

    split = steps.add_parser("split", help="write cells START:STOP of a dataset to a chunk file")
    split.add_argument("input", type=Path)
    split.add_argument("out", type=Path)
    split.add_argument("--start", type=int, required=True)
    split.add_argument("--stop", type=int, required=True)
    split.add_argument("--input-check", type=Path, help="the validate step's summary: counts are read from its counts_source")
    _add_chunk_arg(split)
    split.set_defaults(handler=cmd_step_split, metrics_step="split")

    tokenize = steps.add_parser("tokenize", help="tokenize a chunk into an Arrow file, as the profile's model family does")
    tokenize.add_argument("chunk", type=Path)
    tokenize.add_argument("out", type=Path)
    _add_model_args(tokenize)
    add_gene_args(tokenize)
    tokenize.add_argument("--threads", type=int, default=1, help="threads that rank cells in parallel")
    _add_chunk_arg(tokenize)
    tokenize.set_defaults(handler=cmd_step_tokenize, metrics_step="tokenize")

    embed = steps.add_parser("embed", help="embed a tokenized chunk")
    embed.add_argument("tokens", type=Path)
    embed.add_argument("chunk", type=Path)
    embed.add_argument("out", type=Path)
    _add_model_args(embed)
    embed.add_argument("--threads", type=int)
    embed.add_argument("--batch-size", type=int, help="default from the profile")
    _add_chunk_arg(embed)
    embed.set_defaults(handler=cmd_step_embed, metrics_step="embed")

    gather = steps.add_parser("gather", help="concatenate embedded chunks into one .h5ad")
    gather.add_argument("out", type=Path)
    gather.add_argument("chunks", type=Path, nargs="+")
    gather.add_argument("--model", required=True)
    gather.set_defaults(handler=cmd_step_gather, metrics_step="gather")

    plot = steps.add_parser("plot", help="UMAP of the embeddings")
    plot.add_argument("embeddings", type=Path)
    plot.add_argument("out_png", type=Path)
    plot.add_argument("out_json", type=Path)
    plot.add_argument("--label")
    plot.add_argument("--max-cells", type=int, default=20_000)
    plot.set_defaults(handler=cmd_step_plot, metrics_step="plot_embeddings")

    label_split = steps.add_parser("label-split", help="split labelled cells into train and validation, stratified by label")
    label_split.add_argument("out", type=Path)
    label_split.add_argument("--chunks", type=Path, nargs="+", required=True, help="chunk .h5ad files (obs holds the labels)")
    label_split.add_argument("--tokens", type=Path, nargs="+", required=True, help="their tokenized chunks, in the same order")
    label_split.add_argument("--label", required=True, help="obs column to predict")
    label_split.add_argument("--validation-fraction", type=float, default=0.2)
    label_split.add_argument("--seed", type=int, default=0)
    label_split.set_defaults(handler=cmd_step_label_split, metrics_step="label_split")

    finetune = steps.add_parser("finetune", help="fine-tune a cell classifier with DeepSpeed (resumes from checkpoints)")
    finetune.add_argument("split", type=Path, help="the label-split table")
    finetune.add_argument("out_model", type=Path, help="model folder to write")
    finetune.add_argument("out_log", type=Path, help="training log (TSV) to write")
    finetune.add_argument("--tokens", type=Path, nargs="+", required=True)
    finetune.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder (kept until the model is saved)")
    _add_model_args(finetune)
    finetune.add_argument("--label", default="cell_type", help="name of the predicted obs column, recorded with the model")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--mlflow-uri", default="mlruns", help="MLflow tracking URI, or a folder for a local store")
    finetune.add_argument("--mlflow-experiment", default="helixflow")
    finetune.add_argument("--threads", type=int)
    finetune.set_defaults(handler=cmd_step_finetune, metrics_step="finetune")

    evaluate = steps.add_parser("evaluate", help="score the fine-tuned model and a linear probe on held-out cells")
    evaluate.add_argument("model_dir", type=Path)
    evaluate.add_argument("split", type=Path, help="the label-split table")
    evaluate.add_argument("out_dir", type=Path, help="folder for metrics.json, tables and plots")
    evaluate.add_argument("--tokens", type=Path, nargs="+", required=True)
    evaluate.add_argument("--embeddings", type=Path, required=True, help="frozen-model embeddings (the gather step's output)")
    evaluate.add_argument("--training-log", type=Path, required=True)
    add_inference_args(evaluate)
    evaluate.set_defaults(handler=cmd_step_evaluate, metrics_step="evaluate")

    versions = steps.add_parser("software-versions", help="write pipeline_info/software_versions.yml")
    versions.add_argument("out", type=Path)
    versions.add_argument("--embeddings", type=Path, required=True, help="the gathered embeddings (their provenance record)")
    versions.add_argument("--workflow-versions", required=True, help="'name=version ...' of the workflow's own process")
    versions.set_defaults(handler=cmd_step_software_versions)

    trace = steps.add_parser("trace", help="per-job execution trace from benchmark files")
    trace.add_argument("benchmarks", type=Path)
    trace.add_argument("out_tsv", type=Path)
    trace.add_argument("out_png", type=Path)
    trace.add_argument("--step-metrics", type=Path, required=True, help="the steps' metrics records (HELIXFLOW_METRICS_DIR)")
    trace.set_defaults(handler=cmd_step_trace, metrics_step="pipeline_info")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options that name a step's model: its profile and where it is staged."""
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--profiles-dir", type=Path)


def _add_chunk_arg(parser: argparse.ArgumentParser) -> None:
    """``--chunk-name``, of the steps that work on one chunk."""
    parser.add_argument("--chunk-name", help="the chunk's name, the chunk label of the step's metrics")


def cmd_step_validate(args) -> int:
    from helixflow.split import validate_input

    _, files = profile_and_files(args)
    summary = validate_input(args.input, files, args.out, gene_id_column=args.gene_id_column, symbol_map=symbol_map(args),
                             require_raw_counts=args.raw, counts_source=args.counts_source,
                             label_column=args.label_column)
    print(json.dumps(summary))
    return summary["cells"]


def cmd_step_split(args) -> int:
    from helixflow.split import split_chunk

    counts = json.loads(args.input_check.read_text())["counts_source"] if args.input_check else "X"
    split_chunk(args.input, args.out, args.start, args.stop, counts=counts)
    print(f"helixflow: cells {args.start}:{args.stop} -> {args.out}")
    return args.stop - args.start


def cmd_step_tokenize(args) -> int:
    from helixflow.families import load_family

    profile, files = profile_and_files(args)
    started = time.monotonic()
    cells = load_family(profile["model_name"]).tokenize_chunk(
        args.chunk, files, args.out, gene_column=args.gene_id_column, symbol_map=symbol_map(args),
        threads=args.threads, progress=True)
    print(f"helixflow: tokenized {cells} cells in {time.monotonic() - started:.1f} s -> {args.out}")
    return cells


def cmd_step_embed(args) -> int:
    from helixflow.families import load_family
    from helixflow.provenance import provenance

    profile, files = profile_and_files(args)
    started = time.monotonic()
    cells = load_family(profile["model_name"]).embed_chunk(
        args.tokens, args.chunk, files, args.out, batch_size=args.batch_size or profile["embed"]["batch_size"],
        device=profile["device"], precision=profile["precision"], threads=args.threads, progress=True,
        provenance=provenance(files, profile["name"]))
    print(f"helixflow: embedded {cells} cells in {time.monotonic() - started:.1f} s -> {args.out}")
    return cells


def cmd_step_gather(args) -> int:
    from helixflow.embedding import chunk_provenance, gather_embeddings
    from helixflow.provenance import common_provenance

    # The embed jobs' own record (the environment that computed the embeddings), one for all chunks.
    record = common_provenance([chunk_provenance(chunk) for chunk in args.chunks], args.chunks[0].parent)
    metadata = {"model_profile": args.model, "chunks": len(args.chunks), "provenance": record}
    cells = gather_embeddings(args.chunks, args.out, metadata)
    print(f"helixflow: gathered {cells} cells from {len(args.chunks)} chunks -> {args.out}")
    return cells


def cmd_step_label_split(args) -> int:
    from helixflow.label_split import write_label_split

    summary = write_label_split(args.chunks, args.tokens, args.out, label_column=args.label,
                                validation_fraction=args.validation_fraction, seed=args.seed)
    table = summary.fillna({"label": "(no label)"}).pivot_table(index="label", columns="split", values="cells", aggfunc="sum", fill_value=0)
    print(table.to_string())
    return int(summary["cells"].sum())


def cmd_step_finetune(args) -> int:
    from helixflow.finetune import finetune

    profile, files = profile_and_files(args)
    summary = finetune(args.split, args.tokens, files, profile, args.out_model, args.out_log, args.checkpoints,
                       seed=args.seed, tracking_uri=args.mlflow_uri, experiment=args.mlflow_experiment,
                       label_column=args.label, threads=args.threads)
    print(f"helixflow: fine-tuned in {summary['seconds_this_session']} s ({summary['stop_reason']}): kept epoch "
          f"{summary['kept']['epoch']:g}, validation accuracy {summary['validation_accuracy']:.4f} -> {args.out_model} "
          f"(MLflow run {summary['mlflow_run_id']})")
    return summary["train_cells"] + summary["validation_cells"]


def cmd_step_evaluate(args) -> int:
    from helixflow.evaluate import evaluate

    metrics = evaluate(args.model_dir, args.split, args.tokens, args.embeddings, args.training_log, args.out_dir,
                       batch_size=args.batch_size, device=args.device, precision=args.precision, threads=args.threads)
    print(f"helixflow: held-out accuracy {metrics['fine_tuned']['accuracy']:.4f}, macro-F1 {metrics['fine_tuned']['macro_f1']:.4f} "
          f"(linear probe {metrics['linear_probe']['accuracy']:.4f}, {metrics['linear_probe']['macro_f1']:.4f}; "
          f"chance {metrics['chance_accuracy']:.4f}) -> {args.out_dir}")
    return metrics["validation_cells"]


def cmd_step_plot(args) -> int:
    from helixflow.report import plot_embedding_map

    summary = plot_embedding_map(args.embeddings, args.out_png, args.out_json, label=args.label, max_cells=args.max_cells)
    print(json.dumps(summary))
    return summary["cells_plotted"]


def cmd_step_software_versions(args) -> int:
    from helixflow.provenance import write_software_versions

    versions = write_software_versions(args.out, args.embeddings, args.workflow_versions)
    print(json.dumps(versions, indent=1))
    return 0


def cmd_step_trace(args) -> int:
    from helixflow.report import write_trace

    table = write_trace(args.benchmarks, args.step_metrics, args.out_tsv, args.out_png)
    print(table.to_string(index=False))
    return 0  # it reads the other jobs' records; it processes no cells
