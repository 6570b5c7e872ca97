"""Fine-tuning: split, DeepSpeed ZeRO training on CPU, exact resume, reload, evaluate, annotate, MLflow.

What both model families share is tested for each (the tests taking ``family_data``: Geneformer
and scGPT); the costlier runs (ZeRO-3 training, early stopping, the killed and resumed step) use
Geneformer only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helixflow import cli, deepspeed_engine
from helixflow.cli.front_door import finetune_summary_lines
from helixflow.classifier import FineTunedModel, predict_proba
from helixflow.demo_data import make_demo_dataset
from helixflow.embedding import gather_embeddings
from helixflow.errors import HelixflowError
from helixflow.evaluate import (OUTPUT_FILES, classification_metrics, confusion_counts, evaluate, probe_comparison,
                                write_baseline_check)
from helixflow.finetune import EarlyStopping, finetune
from helixflow.h5ad import chunk_bounds
from helixflow.label_split import VALIDATION, read_label_split, write_label_split
from helixflow.families import load_family
from helixflow.profiles import load_profile
from helixflow.scgpt.files import ScGPTFiles, stage_synthetic
from helixflow.scgpt.tokenization import tokenize_chunk as tokenize_scgpt_chunk
from helixflow.split import split_chunk
from helixflow.token_batches import EpochBatches, LabelledCells, TokenStore, pad_batch
from helixflow.tokenization import tokenize_chunk

N_CELLS = 240  # shallow cells (about 200 genes each) keep training steps fast


@pytest.fixture(scope="module")
def labelled(tiny_v1, tmp_path_factory):
    """A dataset in two chunks, tokenized, with a label split (a fifth of each cell type for validation)."""
    root = tmp_path_factory.mktemp("finetune")
    data = make_demo_dataset(root / "cells.h5ad", N_CELLS, mean_counts=500, seed=4)
    chunks, tokens = [], []
    for index, (start, stop) in enumerate(chunk_bounds(N_CELLS, N_CELLS // 2)):
        chunks.append(split_chunk(data, root / f"chunk-{index:05d}.h5ad", start, stop))
        tokens.append(root / f"chunk-{index:05d}.arrow")
        tokenize_chunk(chunks[-1], tiny_v1, tokens[-1])
    write_label_split(chunks, tokens, root / "split.tsv", label_column="cell_type", validation_fraction=0.2, seed=0)
    counts = read_label_split(root / "split.tsv")["split"].value_counts()
    return SimpleNamespace(root=root, data=data, chunks=chunks, tokens=tokens, split=root / "split.tsv",
                           n_train=counts["train"], n_validation=counts["validation"])


@pytest.fixture(scope="module")
def scgpt_labelled(labelled, tmp_path_factory):
    """The same chunks and label split, tokenized for a tiny scGPT model."""
    root = tmp_path_factory.mktemp("finetune-scgpt")
    files = ScGPTFiles(root / "model")
    stage_synthetic(files)
    tokens = [root / f"{chunk.stem}.arrow" for chunk in labelled.chunks]
    for chunk, out in zip(labelled.chunks, tokens):
        tokenize_scgpt_chunk(chunk, files, out, gene_column="gene_symbol")
    return SimpleNamespace(**{**vars(labelled), "root": root, "tokens": tokens, "files": files})


@pytest.fixture(scope="module", params=["geneformer", "scgpt"])
def family_data(request, tiny_v1):
    """Per family: its staged tiny model and the labelled cells tokenized for it (the tests of shared behaviour)."""
    if request.param == "geneformer":
        return SimpleNamespace(**vars(request.getfixturevalue("labelled")), files=tiny_v1, family="geneformer")
    return SimpleNamespace(**vars(request.getfixturevalue("scgpt_labelled")), family="scgpt")


def user_profile(folder: Path, name: str, model_name: str = "gf-6L-10M-i2048", **train) -> dict:
    """Write a profile for a tiny model with these train settings into ``folder``; load it."""
    settings = {"batch_size": 8, "learning_rate": 3.0e-3, "epochs": 1, "checkpoint_every": 5, **train}
    profile = {"name": name, "model_name": model_name, "device": "cpu", "precision": "fp32", "train": settings}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(profile))
    return load_profile(name, folder)


@pytest.fixture(scope="module")
def zero2_model(family_data):
    """The family's classifier fine-tuned with ZeRO-2, optimizer state offloaded to CPU, bf16 (the tiny profile's way)."""
    epochs = {"geneformer": 2, "scgpt": 3}[family_data.family]  # the tiny scGPT's random encoder learns slower
    profile = user_profile(family_data.root / "profiles", "zero2", family_data.files.model_name, zero_stage=2,
                           offload_optimizer="cpu", precision="bf16", epochs=epochs)
    out = family_data.root / "zero2"
    summary = finetune(family_data.split, family_data.tokens, family_data.files, profile, out / "model",
                       out / "training_log.tsv", out / "checkpoints", seed=0, tracking_uri=out / "mlruns")
    return SimpleNamespace(dir=out, model=out / "model", log=out / "training_log.tsv", summary=summary, epochs=epochs)


def test_label_split_is_stratified_and_reproducible(family_data, tmp_path):
    """The split of the family's tokenized cells (a cell without tokens would have no label)."""
    summary = write_label_split(family_data.chunks, family_data.tokens, tmp_path / "split.tsv",
                                label_column="cell_type", validation_fraction=0.2, seed=0)
    table = read_label_split(tmp_path / "split.tsv")
    assert len(table) == N_CELLS and set(table["split"]) == {"train", "validation"}
    for _, cells in table.groupby("label"):
        assert (cells["split"] == VALIDATION).sum() == max(1, round(0.2 * len(cells)))
    write_label_split(family_data.chunks, family_data.tokens, tmp_path / "again.tsv",
                      label_column="cell_type", validation_fraction=0.2, seed=0)
    assert (tmp_path / "again.tsv").read_bytes() == (tmp_path / "split.tsv").read_bytes()
    counted = table.groupby(["label", "split"]).size()
    assert summary.set_index(["label", "split"])["cells"].to_dict() == counted.to_dict()
    write_label_split(family_data.chunks, family_data.tokens, tmp_path / "other.tsv",
                      label_column="cell_type", validation_fraction=0.2, seed=1)
    other = read_label_split(tmp_path / "other.tsv")
    assert not np.array_equal(other["split"], table["split"])
    assert other.groupby(["label", "split"]).size().to_dict() == counted.to_dict()  # same counts, other cells


def test_label_split_names_a_missing_label_column(family_data, tmp_path):
    with pytest.raises(HelixflowError, match="no obs column 'celltype'.*cell_type"):
        write_label_split(family_data.chunks, family_data.tokens, tmp_path / "split.tsv",
                          label_column="celltype", validation_fraction=0.2, seed=0)


def test_zero2_with_cpu_optimizer_offload_trains(family_data, zero2_model):
    log = pd.read_csv(zero2_model.log, sep="\t")
    losses = log["train_loss"].dropna().to_numpy()
    assert len(losses) == zero2_model.epochs * math.ceil(family_data.n_train / 8)  # one row per optimizer step
    assert losses[-5:].mean() < 0.5 * losses[:5].mean()
    assert log["validation_accuracy"].dropna().iloc[-1] > 0.5  # 6 classes: chance is 0.17
    assert not (zero2_model.dir / "checkpoints").exists()  # removed once the model is saved
    saved = FineTunedModel.open(zero2_model.model)
    assert saved.metadata["train"]["zero_stage"] == 2 and saved.metadata["precision"] == "bf16"
    assert saved.metadata["family"] == family_data.family and saved.metadata["base_model"] == family_data.files.model_name
    assert validation_scores(zero2_model.model, family_data)["validation_accuracy"] == pytest.approx(
        zero2_model.summary["validation_accuracy"])


def test_zero3_with_parameter_offload_trains(labelled, tiny_v1):
    profile = user_profile(labelled.root / "profiles", "zero3", zero_stage=3, offload_params="cpu", offload_optimizer="cpu")
    out = labelled.root / "zero3"
    finetune(labelled.split, labelled.tokens, tiny_v1, profile, out / "model", out / "log.tsv", out / "checkpoints",
             tracking_uri=out / "mlruns")
    log = pd.read_csv(out / "log.tsv", sep="\t")
    losses = log["train_loss"].dropna().to_numpy()
    assert losses[-5:].mean() < losses[:5].mean()
    assert log["validation_accuracy"].dropna().iloc[-1] > 0.34  # twice chance after one short epoch
    weights = load_file(out / "model" / "model.safetensors")
    assert weights["bert.embeddings.word_embeddings.weight"].shape == (2002, 128)  # gathered, not a ZeRO-3 shard


def test_mlflow_run_holds_params_metrics_and_model(family_data, zero2_model):
    import mlflow

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = mlflow.MlflowClient(tracking_uri=(zero2_model.dir / "mlruns").resolve().as_uri())
    run = client.get_run(zero2_model.summary["mlflow_run_id"])
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["precision"] == "bf16"
    assert {"train_loss", "learning_rate", "validation_accuracy"} <= set(run.data.metrics)
    steps = zero2_model.epochs * math.ceil(family_data.n_train / 8)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == steps
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "model")}
    saved = ("model.safetensors", "helixflow.json", *load_family(family_data.files.model_name).classifier_files)
    assert {f"model/{name}" for name in saved} <= artifacts


def validation_scores(model_dir: Path, labelled) -> dict:
    """Validation loss and accuracy of a saved classifier, computed here as the training loop does."""
    split = read_label_split(labelled.split)
    labels = FineTunedModel.open(model_dir).metadata["labels"]
    cells = LabelledCells.from_split(split[split["split"] == VALIDATION], labels, TokenStore(labelled.tokens))
    model = FineTunedModel.open(model_dir).load_model(torch.device("cpu"))
    probabilities = predict_proba(model, cells.fetch, cells.lengths, n_classes=len(labels), batch_size=16,
                                  device=torch.device("cpu"), padding=FineTunedModel.open(model_dir).padding())
    chosen = probabilities[np.arange(len(cells)), cells.targets]
    return {"validation_loss": float(-np.log(chosen).mean()),
            "validation_accuracy": float((probabilities.argmax(axis=1) == cells.targets).mean())}


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience(labelled, tiny_v1):
    """A learning rate far too high: validation loss soon gets worse, training stops and the best epoch is saved."""
    profile = user_profile(labelled.root / "profiles", "overshoot", learning_rate=0.05, epochs=4, patience=1)
    out = labelled.root / "overshoot"
    summary = finetune(labelled.split, labelled.tokens, tiny_v1, profile, out / "model", out / "log.tsv",
                       out / "checkpoints", tracking_uri=out / "mlruns")
    validations = pd.read_csv(out / "log.tsv", sep="\t").dropna(subset=["validation_loss"]).reset_index(drop=True)
    best = int(validations["validation_loss"].idxmin())  # idxmin: the first of equal values, as training keeps
    assert len(validations) == best + 1 + 1 < 4  # stopped after one epoch without improvement
    assert summary["stop_reason"].startswith("stopped early: validation_loss not better")
    assert validations["kept"].tolist() == [index == best for index in range(len(validations))]
    kept = validations.loc[best]
    assert summary["kept"]["epoch"] == kept["epoch"]
    assert summary["validation_accuracy"] == pytest.approx(kept["validation_accuracy"])
    assert FineTunedModel.open(out / "model").metadata["kept"] == summary["kept"]
    reloaded = validation_scores(out / "model", labelled)  # the saved weights are the kept epoch's, not the last
    assert reloaded["validation_accuracy"] == pytest.approx(kept["validation_accuracy"])
    assert reloaded["validation_loss"] == pytest.approx(kept["validation_loss"], rel=1e-4)
    assert reloaded["validation_loss"] != pytest.approx(validations["validation_loss"].iloc[-1], rel=1e-3)


@pytest.mark.parametrize(("metric", "value", "improves"), [
    ("validation_loss", 0.50, False),  # a tie keeps the earlier epoch
    ("validation_loss", 0.495, False),  # not by more than min_delta
    ("validation_loss", 0.48, True),
    ("validation_accuracy", 0.80, False),
    ("validation_accuracy", 0.82, True),
    ("validation_accuracy", 0.70, False),
])
def test_an_improvement_is_better_by_more_than_min_delta(metric, value, improves):
    best = {"validation_loss": 0.50, "validation_accuracy": 0.80}
    stopping = EarlyStopping(metric, patience=1, min_delta=0.01)
    assert stopping.improves({**best, metric: value}, best) is improves
    assert stopping.improves(best, None)  # the first validation is the best so far


def test_reloaded_model_predicts_what_the_trained_engine_did(family_data, tmp_path):
    """ZeRO-3 partitions the weights: saving must gather them, and reloading must give the same predictions."""
    split = read_label_split(family_data.split)
    labels = sorted(split["label"].unique())
    cells = LabelledCells.from_split(split[split["split"] == "train"], labels, TokenStore(family_data.tokens))
    train = user_profile(tmp_path, "reload", zero_stage=3, offload_params="cpu", offload_optimizer="cpu")["train"]
    family = load_family(family_data.files.model_name)
    padding = family.padding(family_data.files)
    model = family.build_classifier(family_data.files, labels, frozen_layers=1, seed=0)
    engine = deepspeed_engine.initialize(model, train, precision="fp32", device=torch.device("cpu"), total_steps=4)
    for step in range(4):
        batch = np.arange(step * 8, step * 8 + 8)
        loss = torch.nn.functional.cross_entropy(engine(**pad_batch(cells.fetch(batch), padding)).logits,
                                                 torch.from_numpy(cells.targets[batch].astype(np.int64)))
        engine.backward(loss)
        engine.step()
    engine.eval()
    trained = predict_proba(engine, cells.fetch, cells.lengths, n_classes=len(labels), batch_size=16,
                            device=torch.device("cpu"), padding=padding)
    family.save_classifier(deepspeed_engine.gathered_state_dict(engine), model, family_data.files, tmp_path / "model",
                           {"label_column": "cell_type"})

    saved = FineTunedModel.open(tmp_path / "model")
    assert saved.metadata["family"] == family_data.family
    reloaded = saved.load_model(torch.device("cpu"))
    assert reloaded.config.id2label == dict(enumerate(labels))
    again = predict_proba(reloaded, cells.fetch, cells.lengths, n_classes=len(labels), batch_size=16,
                          device=torch.device("cpu"), padding=saved.padding())
    np.testing.assert_array_equal(again.argmax(axis=1), trained.argmax(axis=1))
    np.testing.assert_allclose(again, trained, atol=1e-5)


def test_killed_run_resumes_to_the_same_weights(labelled, models_dir, tmp_path):
    """Kill the real step (SIGKILL) at a checkpoint after the first validation (step 12); rerun it; compare with
    an uninterrupted run: the same weights, log, kept epoch and early stop. The best and the count of epochs
    without improvement must come back from the checkpoint (validation accuracy falls in epoch 2 here)."""
    user_profile(tmp_path / "profiles", "resume", zero_stage=2, offload_optimizer="cpu", precision="bf16",
                 gradient_accumulation=2, epochs=3, checkpoint_every=3, learning_rate=0.05, patience=1,
                 best_metric="validation_accuracy")
    (models_dir / "resume").symlink_to(models_dir / "tiny")

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "helixflow.cli", "step", "finetune", str(labelled.split), str(out / "model"),
                str(out / "log.tsv"), "--tokens", *map(str, labelled.tokens), "--checkpoints", str(out / "checkpoints"),
                "--models-dir", str(models_dir), "--profile", "resume", "--profiles-dir", str(tmp_path / "profiles"),
                "--mlflow-uri", str(tmp_path / "mlruns"), "--seed", "5"]

    # A fresh one-process world each: this test process may already hold a DeepSpeed one.
    env = {key: value for key, value in os.environ.items() if key not in deepspeed_engine.WORLD_VARIABLES}
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=env)

    killed = subprocess.Popen(command(tmp_path / "resumed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    latest = tmp_path / "resumed" / "checkpoints" / "latest"
    while not (latest.exists() and latest.read_text() > "step-00000012") and time.monotonic() < deadline:
        assert killed.poll() is None, "the run ended before a checkpoint of its second epoch"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = subprocess.run(command(tmp_path / "resumed"), check=True, capture_output=True, text=True, env=env)
    assert "helixflow: resumed at optimizer step 15" in resumed.stderr

    whole, again = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "resumed"))
    assert whole.keys() == again.keys()
    for name in whole:
        assert torch.equal(whole[name], again[name]), name  # bit-exact
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "log.tsv", sep="\t"),
                                  pd.read_csv(tmp_path / "resumed" / "log.tsv", sep="\t"))
    decisions = [{key: FineTunedModel.open(tmp_path / run / "model").metadata[key] for key in ("kept", "stop_reason")}
                 for run in ("whole", "resumed")]
    assert decisions[0] == decisions[1] and decisions[0]["stop_reason"].startswith("stopped early")


@pytest.fixture(scope="module")
def embeddings(family_data) -> Path:
    """The family's frozen tiny model's embeddings of every cell, gathered as the workflow does."""
    family = load_family(family_data.files.model_name)
    embedded = []
    for chunk, tokens in zip(family_data.chunks, family_data.tokens):
        embedded.append(family_data.root / "embedded" / f"{chunk.stem}.h5ad")
        family.embed_chunk(tokens, chunk, family_data.files, embedded[-1], batch_size=32, device="cpu",
                           precision="fp32", threads=None, progress=False, provenance=None)
    gather_embeddings(embedded, family_data.root / "embeddings.h5ad", {})
    return family_data.root / "embeddings.h5ad"


def test_evaluate_scores_model_and_linear_probe(family_data, zero2_model, embeddings, tmp_path):
    """Evaluate probes the family's own embeddings (``X_geneformer``, ``X_scgpt``) beside the fine-tuned model."""
    metrics = evaluate(zero2_model.model, family_data.split, family_data.tokens, embeddings,
                       zero2_model.log, tmp_path / "evaluate", device="cpu")
    assert all((tmp_path / "evaluate" / name).is_file() for name in OUTPUT_FILES)
    assert json.loads((tmp_path / "evaluate" / "metrics.json").read_text()) == metrics
    assert metrics["validation_cells"] == family_data.n_validation and metrics["chance_accuracy"] == pytest.approx(1 / 6)
    for scores in (metrics["fine_tuned"], metrics["linear_probe"]):
        assert scores["accuracy"] > 0.5 and 0 < scores["macro_f1"] <= 1
        assert set(scores["per_class"]) == set(metrics["classes"])
    # The same validation cells as in training: the same accuracy as the training log's last.
    assert metrics["fine_tuned"]["accuracy"] == pytest.approx(zero2_model.summary["validation_accuracy"], abs=0.03)
    # The per-cell table, in the split's order, gives the same scores (counted block by block by evaluate).
    predictions = pd.read_csv(tmp_path / "evaluate" / "predictions.tsv", sep="\t")
    split = read_label_split(family_data.split)
    assert predictions["cell_index"].tolist() == split.loc[split["split"] == "validation", "cell_index"].tolist()
    for column, scores in (("fine_tuned", metrics["fine_tuned"]), ("linear_probe", metrics["linear_probe"])):
        assert (predictions[column] == predictions["true"]).mean() == pytest.approx(scores["accuracy"])


def test_evaluate_says_plainly_when_the_linear_probe_wins(family_data, embeddings, tmp_path, caplog):
    """An untrained head (zero training steps) loses to the probe: metrics.json, the log, the report page and MLflow say so."""
    from helixflow.tracking import resolve_tracking_uri, tracked_run

    labels = sorted(read_label_split(family_data.split)["label"].unique())
    family = load_family(family_data.files.model_name)
    model = family.build_classifier(family_data.files, labels, frozen_layers=0, seed=0)
    with tracked_run(tmp_path / "mlruns", experiment="untrained") as tracker:
        run_id = tracker.run_id
    metadata = {"profile": "tiny", "label_column": "cell_type", "labels": labels, "seed": 0, "train_cells": int(family_data.n_train),
                "optimizer_steps": 0, "mlflow_tracking_uri": resolve_tracking_uri(tmp_path / "mlruns"), "mlflow_run_id": run_id}
    family.save_classifier(model.state_dict(), model, family_data.files, tmp_path / "model", metadata)
    log = tmp_path / "log.tsv"
    log.write_text("step\tepoch\ttrain_loss\tlearning_rate\tvalidation_loss\tvalidation_accuracy\tkept\n")
    with caplog.at_level(logging.WARNING, logger="helixflow.evaluate"):
        metrics = evaluate(tmp_path / "model", family_data.split, family_data.tokens, embeddings, log, tmp_path / "evaluate",
                           device="cpu")

    accuracy, probe_accuracy = metrics["fine_tuned"]["accuracy"], metrics["linear_probe"]["accuracy"]
    assert accuracy < probe_accuracy
    comparison = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["probe_comparison"]
    assert comparison["probe_wins"] and "accuracy" in comparison["probe_higher_on"]
    assert comparison["message"].startswith("fine-tuning: held-out accuracy")
    assert f"{accuracy:.3f}" in comparison["message"] and f"the linear probe's {probe_accuracy:.3f}" in comparison["message"]
    warnings = [record.getMessage() for record in caplog.records
                if record.name == "helixflow.evaluate" and record.levelno == logging.WARNING]
    assert warnings == [comparison["message"]]
    assert comparison["message"] in (tmp_path / "evaluate" / "baseline_check.html").read_text()
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tmp_path / "mlruns")).get_run(run_id)
    assert run.data.tags["probe_beats_fine_tuning"] == "True" and run.data.metrics["probe_wins"] == 1


def scores(accuracy: float, macro_f1: float) -> dict:
    return {"accuracy": accuracy, "macro_f1": macro_f1}


ADVICE = "on frozen embeddings; the frozen model + probe is the better classifier here"


@pytest.mark.parametrize(("fine_tuned", "probe", "message"), [
    (scores(0.65, 0.60), scores(0.94, 0.93),
     f"fine-tuning: held-out accuracy and macro-F1 0.650 and 0.600 are below the linear probe's 0.940 and 0.930 {ADVICE}"),
    (scores(0.90, 0.80), scores(0.90, 0.85),  # equal accuracy is no win
     f"fine-tuning: held-out macro-F1 0.800 is below the linear probe's 0.850 {ADVICE}"),
    (scores(0.95, 0.94), scores(0.90, 0.94), None),
])
def test_probe_comparison_names_each_score_the_probe_wins_on(fine_tuned, probe, message, tmp_path):
    comparison = probe_comparison(fine_tuned, probe)
    assert comparison["message"] == message and comparison["probe_wins"] == (message is not None)
    metrics = {"fine_tuned": fine_tuned, "linear_probe": probe, "probe_comparison": comparison}
    write_baseline_check(metrics, tmp_path / "check.html")
    page = (tmp_path / "check.html").read_text()
    lines = finetune_summary_lines(metrics, Path("model"), Path("report.html"))
    if message:
        assert message in page and lines[-1] == f"{message} (see report.html)"
    else:
        assert len(lines) == 1 and "below the linear probe" not in page + "\n".join(lines)


def test_annotate_predicts_every_cell(family_data, zero2_model, tmp_path):
    """A new dataset is tokenized with the saved model's own vocabulary and every cell labelled."""
    out = tmp_path / "annotated.h5ad"
    assert cli.main(["annotate", str(family_data.data), "--model-dir", str(zero2_model.model), "--out", str(out)]) == 0
    annotated = ad.read_h5ad(out)
    original = ad.read_h5ad(family_data.data)
    pd.testing.assert_frame_equal(annotated.obs[original.obs.columns], original.obs)
    predicted = annotated.obs["predicted_cell_type"]
    assert predicted.notna().all() and set(predicted.cat.categories) == set(original.obs["cell_type"].cat.categories)
    assert ((annotated.obs["prediction_probability"] > 0) & (annotated.obs["prediction_probability"] <= 1)).all()
    assert (predicted.astype(str) == original.obs["cell_type"].astype(str)).mean() > 0.5


def test_classification_metrics_on_a_known_case():
    confusion = confusion_counts(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)  # class codes
    metrics = classification_metrics(confusion, ["a", "b", "c"])
    assert metrics["accuracy"] == 0.75
    assert metrics["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and metrics["per_class"]["c"]["support"] == 0
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_metrics_from_confusion_blocks_equal_scikit_learn_on_all_cells():
    """Evaluate adds up a confusion matrix block by block; its metrics must be scikit-learn's on every cell."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(7)
    truth, predicted = rng.integers(0, 5, 10_001), rng.integers(0, 6, 10_001) % 5  # class 4 rarely predicted
    predicted[truth == 3] = 3  # one class always right
    labels = list("abcdef")  # "f" has no cells at all
    confusion = sum(confusion_counts(truth[block], predicted[block], len(labels)) for block in np.array_split(np.arange(10_001), 7))
    metrics = classification_metrics(confusion, labels)
    codes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=codes, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, labels=codes, average="macro", zero_division=0))
    for label, p, r, f, n in zip(labels, precision, recall, f1, support):
        assert metrics["per_class"][label] == {"precision": pytest.approx(p), "recall": pytest.approx(r),
                                               "f1": pytest.approx(f), "support": n}


def test_epoch_batches_cover_every_cell_once_in_the_same_order_each_time():
    lengths = np.random.default_rng(1).integers(1, 300, 2_345).astype(np.int32)
    batches = EpochBatches(lengths, 16, seed=3, epoch=2)
    cells = np.concatenate([batches[i] for i in range(len(batches))])
    assert len(batches) == -(-2_345 // 16) and np.array_equal(np.sort(cells), np.arange(2_345))
    again = EpochBatches(lengths, 16, seed=3, epoch=2)
    assert all(np.array_equal(batches[i], again[i]) for i in range(len(batches)))
    assert not np.array_equal(batches[0], EpochBatches(lengths, 16, seed=3, epoch=3)[0])
    # Within a window of batches, cells are sorted by length: the spread inside a batch stays small.
    spread = np.median([np.ptp(lengths[batches[i]]) for i in range(len(batches))])
    assert spread < np.ptp(lengths) / 10


@pytest.mark.parametrize(("train", "precision", "device", "expected"), [
    ({"zero_stage": 2, "offload_optimizer": "cpu"}, "bf16", "cpu",
     {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}, "bf16": {"enabled": True}}),
    ({"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}, "fp32", "cpu",
     {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                            "offload_param": {"device": "cpu", "pin_memory": False}}}),
    ({"zero_stage": 1}, "fp16", "cuda", {"zero_optimization": {"stage": 1}}),
])
def test_deepspeed_config_follows_the_profile(train, precision, device, expected):
    settings = {"batch_size": 4, "gradient_accumulation": 8, "learning_rate": 1e-4, "offload_optimizer": "none",
                "offload_params": "none", **train}
    config = deepspeed_engine.deepspeed_config(settings, precision=precision, device_type=device)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 8
    for key, value in expected.items():
        assert config[key] == value
    assert ("optimizer" in config) == (settings["offload_optimizer"] == "cpu")  # offloaded state: DeepSpeed's CPU Adam
    if precision == "fp16":
        assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0  # 0: dynamic loss scaling
    assert ("bf16" in config) == (precision == "bf16")


def test_learning_rate_warms_up_from_the_first_step_then_decays():
    factor = deepspeed_engine.warmup_decay(total_steps=20)
    assert [factor(step) for step in range(4)] == [0.5, 1.0, 18 / 18, 17 / 18]
    assert factor(19) == 1 / 18 and factor(20) == 0.0


@pytest.mark.parametrize(("train", "precision", "message"), [
    ({"zero_stage": 2, "offload_params": "cpu"}, "fp32", "offload_params: cpu needs zero_stage: 3"),
    ({"zero_stage": 0, "offload_optimizer": "cpu"}, "fp32", "offload_optimizer needs zero_stage 1, 2 or 3"),
    ({"zero_stage": 2}, "fp16", "fp16 training needs a GPU"),
])
def test_deepspeed_config_refuses_what_cannot_run(train, precision, message):
    settings = {"batch_size": 4, "gradient_accumulation": 1, "learning_rate": 1e-4, "offload_optimizer": "none",
                "offload_params": "none", **train}
    with pytest.raises(HelixflowError, match=message):
        deepspeed_engine.deepspeed_config(settings, precision=precision, device_type="cpu")
