"""The ``evaluate`` step: how good the fine-tuned classifier is on held-out cells.

Both the fine-tuned model and a baseline are scored on the validation cells of the label
split. The baseline is a linear probe: a logistic regression on the frozen model's
embeddings (``embeddings.h5ad``) of the training cells, which shows what fine-tuning adds
over the pretrained representation. Results go to ``metrics.json`` (accuracy, macro-F1,
per-class precision and recall), two tables and two plots for the report, and the
fine-tune's MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from helixflow.classifier import FineTunedModel, class_labels, predict_proba
from helixflow.embedding import EMBEDDING_KEY, resolve_device
from helixflow.errors import HelixflowError
from helixflow.label_split import TRAIN, VALIDATION, read_label_split
from helixflow.outputs import atomic_path
from helixflow.token_batches import LabelledCells, TokenStore
from helixflow.tracking import tracked_run

PROBE_MAX_TRAIN_CELLS = 50_000  # the probe's training cells are subsampled beyond this
OUTPUT_FILES = ("metrics.json", "summary.tsv", "per_class.tsv", "predictions.tsv", "confusion_matrix.png", "training_curve.png")


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, support)},
    }


def linear_probe(embeddings_path: str | Path, split: pd.DataFrame, seed: int = 0) -> tuple[np.ndarray, int]:
    """Predict validation labels with a logistic regression on frozen embeddings of train cells.

    Returns
    -------
    predicted, n_train
        Predicted label of each validation cell, and how many train cells the probe saw.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = split[split["split"] == TRAIN]
    if len(train) > PROBE_MAX_TRAIN_CELLS:
        train = train.sample(PROBE_MAX_TRAIN_CELLS, random_state=seed).sort_values("cell_index")
    validation = split[split["split"] == VALIDATION]
    with h5py.File(embeddings_path, "r") as handle:
        embeddings = handle[f"obsm/{EMBEDDING_KEY}"]
        if embeddings.shape[0] != len(split):
            raise HelixflowError(embeddings_path, f"holds {embeddings.shape[0]} cells but the label split {len(split)}")
        train_x, validation_x = embeddings[train["cell_index"].to_numpy()], embeddings[validation["cell_index"].to_numpy()]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2_000))
    probe.fit(train_x, train["label"].to_numpy(dtype=str))
    return probe.predict(validation_x), len(train)


def plot_confusion_matrices(truth: np.ndarray, predictions: dict[str, np.ndarray], scores: dict[str, dict],
                            labels: list[str], out: str | Path) -> None:
    """Row-normalised confusion matrices side by side, one per model."""
    from sklearn.metrics import confusion_matrix

    figure, axes = plt.subplots(1, len(predictions), figsize=(5.2 * len(predictions), 4.8), squeeze=False)
    for axis, (name, predicted) in zip(axes[0], predictions.items()):
        matrix = confusion_matrix(truth, predicted, labels=labels, normalize="true")
        axis.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        for (row, column), value in np.ndenumerate(matrix):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.set(xlabel="predicted", ylabel="true",
                 title=f"{name}\naccuracy {scores[name]['accuracy']:.3f}, macro-F1 {scores[name]['macro_f1']:.3f}")
    figure.tight_layout()
    with atomic_path(out) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)


def plot_training_curve(log: pd.DataFrame, out: str | Path) -> None:
    """Training loss per optimizer step, validation loss and accuracy per epoch."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = log.dropna(subset=["train_loss"])
    validation = log.dropna(subset=["validation_loss"])
    loss_axis.plot(steps["step"], steps["train_loss"], lw=1, label="training (per step)")
    loss_axis.plot(validation["step"], validation["validation_loss"], "o-", label="validation (per epoch)")
    loss_axis.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    loss_axis.legend()
    accuracy_axis.plot(validation["epoch"], validation["validation_accuracy"], "o-")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="Validation accuracy")
    figure.tight_layout()
    with atomic_path(out) as partial:
        figure.savefig(partial, dpi=110, format="png")
    plt.close(figure)


def evaluate(
    model_dir: str | Path,
    split_path: str | Path,
    tokens_paths: list[str | Path],
    embeddings_path: str | Path,
    training_log: str | Path,
    out_dir: str | Path,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
) -> dict:
    """Score the fine-tuned model and the linear probe on the validation cells.

    Writes ``OUTPUT_FILES`` into ``out_dir``, logs the scores and files to the model's
    MLflow run, and returns the metrics.
    """
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    fine_tuned = FineTunedModel.open(model_dir)
    split = read_label_split(split_path)
    torch_device = resolve_device(device)
    model = fine_tuned.load_model(torch_device)
    labels = class_labels(model)
    validation = LabelledCells(split[split["split"] == VALIDATION], labels, TokenStore(tokens_paths))
    probabilities = predict_proba(model, validation.fetch, validation.lengths, len(labels), batch_size, torch_device, precision)
    truth = np.asarray(labels)[validation.targets]
    predictions = {"fine-tuned": np.asarray(labels)[probabilities.argmax(axis=1)]}
    predictions["linear probe"], probe_cells = linear_probe(embeddings_path, split, fine_tuned.metadata["seed"])
    scores = {name: classification_metrics(truth, predicted, labels) for name, predicted in predictions.items()}
    chance = 1 / len(labels)
    metrics = {
        "label_column": fine_tuned.metadata["label_column"], "classes": labels,
        "train_cells": fine_tuned.metadata["train_cells"], "validation_cells": len(validation),
        "chance_accuracy": chance, "fine_tuned": scores["fine-tuned"],
        "linear_probe": {**scores["linear probe"], "train_cells": probe_cells},
        "model": {key: fine_tuned.metadata[key] for key in ("base_model", "profile", "optimizer_steps", "mlflow_run_id")},
    }
    write_tables(metrics, split[split["split"] == VALIDATION], truth, predictions, probabilities, out_dir)
    plot_confusion_matrices(truth, predictions, scores, labels, out_dir / "confusion_matrix.png")
    plot_training_curve(pd.read_csv(training_log, sep="\t"), out_dir / "training_curve.png")
    with atomic_path(out_dir / "metrics.json") as partial:
        partial.write_text(json.dumps(metrics, indent=2) + "\n")
    log_to_mlflow(fine_tuned.metadata, metrics, out_dir)
    return metrics


def write_tables(metrics: dict, validation: pd.DataFrame, truth: np.ndarray, predictions: dict[str, np.ndarray],
                 probabilities: np.ndarray, out_dir: Path) -> None:
    """Write the summary, per-class and per-cell prediction tables (TSV)."""
    summary = pd.DataFrame([
        {"model": "fine-tuned", "accuracy": metrics["fine_tuned"]["accuracy"], "macro_f1": metrics["fine_tuned"]["macro_f1"]},
        {"model": "linear probe (frozen embeddings)", "accuracy": metrics["linear_probe"]["accuracy"],
         "macro_f1": metrics["linear_probe"]["macro_f1"]},
        {"model": "chance (uniform guess)", "accuracy": metrics["chance_accuracy"], "macro_f1": np.nan},
    ])
    per_class = pd.DataFrame([
        {"class": label, "support": scores["support"],
         **{f"fine_tuned_{key}": scores[key] for key in ("precision", "recall", "f1")},
         **{f"probe_{key}": metrics["linear_probe"]["per_class"][label][key] for key in ("precision", "recall", "f1")}}
        for label, scores in metrics["fine_tuned"]["per_class"].items()
    ])
    cells = pd.DataFrame({"cell_index": validation["cell_index"].to_numpy(), "cell_id": validation["cell_id"].to_numpy(),
                          "true": truth, "fine_tuned": predictions["fine-tuned"],
                          "fine_tuned_probability": probabilities.max(axis=1), "linear_probe": predictions["linear probe"]})
    for name, table in (("summary.tsv", summary), ("per_class.tsv", per_class), ("predictions.tsv", cells)):
        with atomic_path(out_dir / name) as partial:
            table.to_csv(partial, sep="\t", index=False, float_format="%.4f")


def log_to_mlflow(metadata: dict, metrics: dict, out_dir: Path) -> None:
    """Add held-out scores and the evaluation files to the fine-tune's MLflow run."""
    scores = {"heldout_accuracy": metrics["fine_tuned"]["accuracy"], "heldout_macro_f1": metrics["fine_tuned"]["macro_f1"],
              "probe_accuracy": metrics["linear_probe"]["accuracy"], "probe_macro_f1": metrics["linear_probe"]["macro_f1"]}
    for label, values in metrics["fine_tuned"]["per_class"].items():
        key = "".join(character if character.isalnum() else "_" for character in label)
        scores[f"heldout_precision.{key}"] = values["precision"]
        scores[f"heldout_recall.{key}"] = values["recall"]
    with tracked_run(metadata["mlflow_tracking_uri"], run_id=metadata["mlflow_run_id"]) as tracker:
        tracker.log_metrics(scores)
        for name in OUTPUT_FILES:
            tracker.log_artifacts(out_dir / name, "evaluation")
