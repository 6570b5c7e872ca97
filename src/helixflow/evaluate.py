"""The ``evaluate`` step: how good the fine-tuned classifier is on held-out cells.

Both the fine-tuned model and a baseline are scored on the validation cells of the label
split. The baseline is a linear probe: a logistic regression on the frozen model's
embeddings (``embeddings.h5ad``) of the training cells, which shows what fine-tuning adds
over the pretrained representation. Results go to ``metrics.json`` (accuracy, macro-F1,
per-class precision and recall), two tables and two plots for the report, and the
fine-tune's MLflow run.

When the probe scores higher than the fine-tuned model (accuracy or macro-F1), fine-tuning
did worse than not fine-tuning at all: ``metrics.json``'s ``probe_comparison`` says so, a
WARNING is logged, the MLflow run is tagged, and ``baseline_check.html`` (the report's first
fine-tuning item) shows the message.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from helixflow.classifier import FineTunedModel, class_labels, predict_proba
from helixflow.embedding import resolve_device
from helixflow.errors import HelixflowError
from helixflow.families import model_family
from helixflow.h5ad import read_rows
from helixflow.label_split import TRAIN, VALIDATION, draw_uniform, iter_label_split
from helixflow.outputs import atomic_path
from helixflow.token_batches import LabelledCells, Padding, TokenStore, scoring_blocks
from helixflow.tracking import tracked_run

LOGGER = logging.getLogger(__name__)
PROBE_MAX_TRAIN_CELLS = 50_000  # the probe's training cells are subsampled beyond this
OUTPUT_FILES = ("metrics.json", "summary.tsv", "per_class.tsv", "predictions.tsv", "confusion_matrix.png", "training_curve.png",
                "baseline_check.html")
COMPARED_SCORES = {"accuracy": "accuracy", "macro_f1": "macro-F1"}  # key in the scores: name in messages


def confusion_counts(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Cells per (true class, predicted class): an ``(n_classes, n_classes)`` int64 matrix of class codes."""
    pairs = truth.astype(np.int64) * n_classes + predicted.astype(np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(confusion: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support, from a confusion matrix.

    ``confusion[i, j]`` counts cells of class ``labels[i]`` predicted as ``labels[j]``; blocks of
    cells add up, so every validation cell is scored without keeping per-cell results. A ratio
    with nothing to divide by is 0 (scikit-learn's ``zero_division=0``), and the macro average
    runs over every class.
    """
    hits = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)

    def ratio(numerator, denominator):
        return np.divide(numerator, denominator, out=np.zeros(len(labels)), where=denominator > 0)

    precision, recall = ratio(hits, predicted), ratio(hits, support)
    f1 = ratio(2 * hits, support + predicted)  # 2 tp / (2 tp + fp + fn)
    return {
        "accuracy": float(hits.sum() / max(1, confusion.sum())),
        "macro_f1": float(f1.mean()),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for label, p, r, f, n in zip(labels, precision, recall, f1, support)},
    }


def fit_linear_probe(embeddings_path: str | Path, split_path: str | Path, labels: list[str], *, seed: int = 0,
                     embedding_key: str):
    """A logistic regression on frozen embeddings (``obsm[embedding_key]``) of (at most ``PROBE_MAX_TRAIN_CELLS``) train cells.

    The train cells are a uniform sample drawn while the split is read block by block, and
    only their embeddings are read, so memory is bounded whatever the number of cells.

    Returns
    -------
    probe, n_train
        The fitted scikit-learn pipeline (it predicts class codes), and the cells it saw.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_cells, n_train = 0, 0
    for block in iter_label_split(split_path, ["split"]):
        n_cells += len(block)
        n_train += int((block["split"] == TRAIN).sum())
    rng = np.random.default_rng(seed)
    left, wanted = n_train, min(n_train, PROBE_MAX_TRAIN_CELLS)
    indices, targets = [], []
    for block in iter_label_split(split_path, ["cell_index", "label", "split"]):
        block = block[block["split"] == TRAIN]
        chosen = draw_uniform(rng, len(block), left, wanted)
        left, wanted = left - len(block), wanted - int(chosen.sum())
        indices.append(block["cell_index"].to_numpy(dtype=np.int64)[chosen])
        targets.append(pd.Categorical(block["label"], categories=labels).codes[chosen])
    with h5py.File(embeddings_path, "r") as handle:
        embeddings = handle[f"obsm/{embedding_key}"]
        if embeddings.shape[0] != n_cells:
            raise HelixflowError(embeddings_path, f"holds {embeddings.shape[0]} cells but the label split {n_cells}")
        train_x = read_rows(embeddings, np.concatenate(indices))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2_000))
    probe.fit(train_x, np.concatenate(targets))
    return probe, len(train_x)


def probe_comparison(fine_tuned: dict, probe: dict) -> dict:
    """Whether the linear probe on frozen embeddings beats the fine-tuned model on held-out cells.

    Parameters
    ----------
    fine_tuned, probe
        Scores of each (:func:`classification_metrics`).

    Returns
    -------
    dict
        ``probe_wins`` (the probe is higher on accuracy or macro-F1), ``probe_higher_on`` (those
        score names), and ``message``: one line naming the scores and what to use instead, or
        ``None`` when fine-tuning is at least as good on both.
    """
    higher = [key for key in COMPARED_SCORES if probe[key] > fine_tuned[key]]
    message = None
    if higher:
        names = " and ".join(COMPARED_SCORES[key] for key in higher)
        ours = " and ".join(f"{fine_tuned[key]:.3f}" for key in higher)
        theirs = " and ".join(f"{probe[key]:.3f}" for key in higher)
        verb = "are" if len(higher) > 1 else "is"
        message = (f"fine-tuning: held-out {names} {ours} {verb} below the linear probe's {theirs} on frozen embeddings; "
                   f"the frozen model + probe is the better classifier here")
    return {"probe_wins": bool(higher), "probe_higher_on": higher, "message": message}


def write_baseline_check(metrics: dict, out: str | Path) -> None:
    """An HTML paragraph for the report: the probe-wins warning, or how fine-tuning compares.

    A fragment, not a page: the report shows it as an item and includes it in captions.
    """
    comparison = metrics["probe_comparison"]
    if comparison["probe_wins"]:
        body = f'<p style="color:#a00000;font-weight:bold">Warning: {html.escape(comparison["message"], quote=False)}.</p>'
    else:
        scores = ", ".join(f"{name} {metrics['fine_tuned'][key]:.3f} (probe {metrics['linear_probe'][key]:.3f})"
                           for key, name in COMPARED_SCORES.items())
        body = f"<p>Fine-tuning is at least as good as the linear probe on frozen embeddings: held-out {scores}.</p>"
    with atomic_path(out) as partial:
        partial.write_text(body + "\n")


def plot_confusion_matrices(confusion: dict[str, np.ndarray], scores: dict[str, dict], labels: list[str],
                            out: str | Path) -> None:
    """Row-normalised confusion matrices side by side, one per model."""
    figure, axes = plt.subplots(1, len(confusion), figsize=(5.2 * len(confusion), 4.8), squeeze=False)
    for axis, (name, counts) in zip(axes[0], confusion.items()):
        totals = counts.sum(axis=1, keepdims=True)
        matrix = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
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
    *,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "fp32",
    threads: int | None = None,
) -> dict:
    """Score the fine-tuned model and the linear probe on the validation cells.

    Every validation cell is scored, block by block (:func:`score_validation_cells`), so memory
    does not grow with the number of cells. Writes ``OUTPUT_FILES`` into ``out_dir``, logs the scores and files to the model's
    MLflow run, and returns the metrics.
    """
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    fine_tuned = FineTunedModel.open(model_dir)
    torch_device = resolve_device(device)
    model = fine_tuned.load_model(torch_device)
    labels = class_labels(model)
    embedding_key = model_family(fine_tuned.model_name).embedding_key
    probe, probe_cells = fit_linear_probe(embeddings_path, split_path, labels, seed=fine_tuned.metadata["seed"],
                                          embedding_key=embedding_key)
    with h5py.File(embeddings_path, "r") as handle, atomic_path(out_dir / "predictions.tsv") as predictions:
        confusion = score_validation_cells(
            model, probe, handle[f"obsm/{embedding_key}"], split_path, tokens_paths, labels, predictions,
            batch_size=batch_size, device=torch_device, precision=precision, padding=fine_tuned.padding())
    scores = {name: classification_metrics(counts, labels) for name, counts in confusion.items()}
    chance = 1 / len(labels)
    metrics = {
        "label_column": fine_tuned.metadata["label_column"], "classes": labels,
        "train_cells": fine_tuned.metadata["train_cells"], "validation_cells": int(confusion["fine-tuned"].sum()),
        "chance_accuracy": chance, "fine_tuned": scores["fine-tuned"],
        "linear_probe": {**scores["linear probe"], "train_cells": probe_cells},
        "model": {key: fine_tuned.metadata[key] for key in ("base_model", "profile", "optimizer_steps", "mlflow_run_id")},
        "probe_comparison": probe_comparison(scores["fine-tuned"], scores["linear probe"]),
    }
    if metrics["probe_comparison"]["probe_wins"]:
        LOGGER.warning("%s", metrics["probe_comparison"]["message"])
    write_tables(metrics, out_dir)
    write_baseline_check(metrics, out_dir / "baseline_check.html")
    plot_confusion_matrices(confusion, scores, labels, out_dir / "confusion_matrix.png")
    plot_training_curve(pd.read_csv(training_log, sep="\t"), out_dir / "training_curve.png")
    with atomic_path(out_dir / "metrics.json") as partial:
        partial.write_text(json.dumps(metrics, indent=2) + "\n")
    log_to_mlflow(fine_tuned.metadata, metrics, out_dir)
    return metrics


def score_validation_cells(model, probe, embeddings: h5py.Dataset, split_path: str | Path,
                           tokens_paths: list[str | Path], labels: list[str], predictions: Path, *, batch_size: int, device: torch.device,
                           precision: str, padding: Padding) -> dict[str, np.ndarray]:
    """Score every validation cell with both models, block by block; return their confusion matrices.

    The label split is read in blocks and each block's validation cells scored in blocks of
    ``SCORING_BLOCK_CELLS``: the fine-tuned model on their tokens, the probe on their frozen
    embeddings. Each block's rows are appended to the ``predictions`` table (TSV, in the
    split's order) and its counts added to the confusion matrices; nothing per cell is kept.
    Only the block's own token files are mapped, so their pages leave memory with the block.
    """
    tokens_of_chunk = {Path(path).stem: path for path in tokens_paths}
    names = np.asarray(labels, dtype=object)
    confusion = {name: np.zeros((len(labels), len(labels)), dtype=np.int64) for name in ("fine-tuned", "linear probe")}
    scored = 0
    for block in iter_label_split(split_path, ["cell_index", "cell_id", "chunk", "row", "label", "split"]):
        block = block[block["split"] == VALIDATION]
        missing = set(block["chunk"]) - set(tokens_of_chunk)
        if missing:
            raise HelixflowError(split_path, f"no tokens file for chunk {min(missing)} among the {len(tokens_paths)} given")
        store = TokenStore([tokens_of_chunk[chunk] for chunk in block["chunk"].unique()])
        cells = LabelledCells.from_split(block, labels, store, with_cell_index=True)
        if (cells.targets < 0).any():
            unknown = block["label"].to_numpy()[cells.targets < 0][0]
            raise HelixflowError(split_path, f"validation cells labelled '{unknown}', a class the model was not trained on")
        cell_ids = block["cell_id"].to_numpy()
        for positions in scoring_blocks(len(cells)):
            part = cells.take(positions)
            probabilities = predict_proba(model, part.fetch, part.lengths, n_classes=len(labels), batch_size=batch_size,
                                          device=device, precision=precision, padding=padding)
            predicted = {"fine-tuned": probabilities.argmax(axis=1),
                         "linear probe": probe.predict(read_rows(embeddings, part.cell_index))}
            for name, classes in predicted.items():
                confusion[name] += confusion_counts(part.targets, classes, len(labels))
            pd.DataFrame({"cell_index": part.cell_index, "cell_id": cell_ids[positions], "true": names[part.targets],
                          "fine_tuned": names[predicted["fine-tuned"]], "fine_tuned_probability": probabilities.max(axis=1),
                          "linear_probe": names[predicted["linear probe"]]},
                         ).to_csv(predictions, sep="\t", index=False, float_format="%.4f", mode="a", header=scored == 0)
            scored += len(part)
    return confusion


def write_tables(metrics: dict, out_dir: Path) -> None:
    """Write the summary and per-class tables (TSV)."""
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
    for name, table in (("summary.tsv", summary), ("per_class.tsv", per_class)):
        with atomic_path(out_dir / name) as partial:
            table.to_csv(partial, sep="\t", index=False, float_format="%.4f")


def log_to_mlflow(metadata: dict, metrics: dict, out_dir: Path) -> None:
    """Add held-out scores, whether the probe wins (metric ``probe_wins``, tag ``probe_beats_fine_tuning``)
    and the evaluation files to the fine-tune's MLflow run."""
    scores = {"heldout_accuracy": metrics["fine_tuned"]["accuracy"], "heldout_macro_f1": metrics["fine_tuned"]["macro_f1"],
              "probe_accuracy": metrics["linear_probe"]["accuracy"], "probe_macro_f1": metrics["linear_probe"]["macro_f1"]}
    for label, values in metrics["fine_tuned"]["per_class"].items():
        key = "".join(character if character.isalnum() else "_" for character in label)
        scores[f"heldout_precision.{key}"] = values["precision"]
        scores[f"heldout_recall.{key}"] = values["recall"]
    scores["probe_wins"] = int(metrics["probe_comparison"]["probe_wins"])
    with tracked_run(metadata["mlflow_tracking_uri"], run_id=metadata["mlflow_run_id"]) as tracker:
        tracker.log_metrics(scores)
        tracker.set_tags({"probe_beats_fine_tuning": metrics["probe_comparison"]["probe_wins"]})
        for name in OUTPUT_FILES:
            tracker.log_artifacts(out_dir / name, "evaluation")
