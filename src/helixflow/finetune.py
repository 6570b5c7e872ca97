"""The ``finetune`` step: train a cell classifier of either model family with DeepSpeed, resumably.

The classifier is the family adapter's (``build_classifier``; Geneformer's
:mod:`helixflow.classifier`, scGPT's :mod:`helixflow.scgpt.classifier`); everything else here
is the same for both families.

Cells come from the tokenized chunks (memory-mapped, one batch read at a time) and their
labels and train/validation assignment from the ``label_split`` table. The model profile's
``train`` section sets batch size, gradient accumulation, frozen layers, learning rate,
epochs, ZeRO stage and offload, how often to checkpoint, and early stopping.

The model is validated after every epoch. The saved model is the one of the best validation
(:class:`EarlyStopping`: by validation loss unless the profile says accuracy), not the last;
training stops early once ``patience`` validations in a row brought no improvement.

Every ``checkpoint_every`` optimizer steps a DeepSpeed checkpoint is saved with everything
a resumed run needs to continue exactly where this one was: model, optimizer and schedule
state, the position in the epoch (batch order is a function of seed and epoch), the random
number generator state (dropout), the loss history, the best weights so far with their
validation, the count of validations without improvement, and the MLflow run. A killed run
started again with the same inputs resumes from its last checkpoint, to the same model and
the same early stop; checkpoints of a run with other inputs or settings are discarded.
Checkpoints are removed once the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helixflow import deepspeed_engine
from helixflow.classifier import predict_proba
from helixflow.embedding import resolve_device
from helixflow.errors import HelixflowError
from helixflow.families import load_family
from helixflow.label_split import TRAIN, VALIDATION, class_names
from helixflow.outputs import atomic_path
from helixflow.profiles import check_train_settings
from helixflow.token_batches import EpochBatches, LabelledCells, Padding, TokenStore, pad_batch, scoring_blocks
from helixflow.tracking import resolve_tracking_uri, tracked_run

LOGGER = logging.getLogger(__name__)
RUN_FILE = "run.json"  # in the checkpoint folder: the fingerprint of the run its checkpoints belong to
# kept: on validation rows, whether that validation's weights are the saved model's.
FINGERPRINT_FILE_BYTES = 4 << 20  # staged files up to this size are fingerprinted by content, larger ones by size
LOG_COLUMNS = ["step", "epoch", "train_loss", "learning_rate", "validation_loss", "validation_accuracy", "kept"]


@dataclass(frozen=True)
class TrainingPlan:
    """How many micro-batches and optimizer steps a run makes.

    Micro-batches left over at the very end, too few for a full gradient-accumulation
    group, are not trained on.
    """

    batches_per_epoch: int
    accumulation: int
    total_steps: int

    @classmethod
    def make(cls, n_cells: int, train: dict) -> TrainingPlan:
        batches_per_epoch = math.ceil(n_cells / train["batch_size"])
        return cls(batches_per_epoch, train["gradient_accumulation"],
                   train["epochs"] * batches_per_epoch // train["gradient_accumulation"])

    @property
    def total_micro_batches(self) -> int:
        return self.total_steps * self.accumulation

    def validation_due(self, state: dict) -> bool:
        """Whether the position in ``state`` ends an epoch (or the run) that is not validated yet."""
        at_end = state["micro_batch"] % self.batches_per_epoch == 0 or state["micro_batch"] >= self.total_micro_batches
        return at_end and state["validated_at"] < state["micro_batch"]


@dataclass(frozen=True)
class EarlyStopping:
    """Which validation is best, and when to stop for want of improvement.

    A validation improves on the best so far only when its ``metric`` is better by more than
    ``min_delta``; on a tie the earlier (shorter-trained) weights stay the best.
    """

    metric: str
    patience: int
    min_delta: float

    @classmethod
    def from_train(cls, train: dict) -> EarlyStopping:
        return cls(train["best_metric"], train["patience"], train["min_delta"])

    def improves(self, record: dict, best: dict | None) -> bool:
        """Whether validation ``record`` is better than ``best`` (``None``: nothing validated yet)."""
        if best is None:
            return True
        if self.metric == "validation_loss":
            return record[self.metric] < best[self.metric] - self.min_delta
        return record[self.metric] > best[self.metric] + self.min_delta

    def update(self, engine, record: dict, state: dict) -> None:
        """Take validation ``record`` into ``state``: keep the weights if best, count it otherwise.

        The best weights are gathered (whole under ZeRO-3) into host memory, one model copy,
        and saved with every checkpoint, so a resumed run keeps the same best and counter.
        """
        if self.improves(record, state["best"]):
            state["best_weights"] = None  # the old copy goes before the new one is gathered
            state["best_weights"] = deepspeed_engine.gathered_state_dict(engine)
            state["best"], state["validations_without_improvement"] = record, 0
        else:
            state["validations_without_improvement"] += 1
        if state["validations_without_improvement"] >= self.patience:
            state["stop_reason"] = (f"stopped early: {self.metric} not better by more than {self.min_delta} "
                                    f"for {self.patience} epochs after epoch {state['best']['epoch']:g}")


def finetune(
    split_path: str | Path,
    tokens_paths: list[str | Path],
    files,
    profile: dict,
    out_model: str | Path,
    out_log: str | Path,
    checkpoints: str | Path,
    *,
    seed: int = 0,
    tracking_uri: str | Path = "mlruns",
    experiment: str = "helixflow",
    label_column: str = "cell_type",
    threads: int | None = None,
) -> dict:
    """Fine-tune a classifier; save its best validated weights and its training log; return a summary.

    The summary (also the model's ``helixflow.json``) names the ``kept`` validation record
    (epoch, step, validation loss and accuracy) and the ``stop_reason``.

    Parameters
    ----------
    split_path
        The ``label_split`` table.
    tokens_paths
        Tokenized chunks; each file's stem is a chunk name of the table.
    files
        The staged base model (its family's model files).
    profile
        The model profile (``name``, ``device``, ``precision``, ``train``); ``train.precision``,
        when set, overrides the profile's precision for training.
    out_model
        Model folder to write (see :func:`helixflow.classifier.save_classifier`).
    out_log
        Training log (TSV): loss and learning rate per optimizer step, validation loss and
        accuracy after each epoch, and which validation's weights were kept.
    checkpoints
        Folder for checkpoints while training.
    seed
        Seed of the head's initial weights, batch order and dropout.
    tracking_uri, experiment
        MLflow store (a path means a local file store) and experiment name.
    label_column
        Name of what is predicted, recorded with the model.
    threads
        CPU threads for torch.
    """
    if threads:
        torch.set_num_threads(threads)
    train = profile["train"]
    precision = train["precision"] or profile["precision"]
    device = resolve_device(profile["device"])
    check_train_settings(train, precision=precision, device=device.type, where=f"profile {profile['name']}: train")
    labels, cells = load_labelled_cells(split_path, tokens_paths)
    plan = TrainingPlan.make(len(cells[TRAIN]), train)
    if plan.total_steps == 0:
        raise HelixflowError(split_path, f"{len(cells[TRAIN])} training cells make no optimizer step of "
                                         f"batch_size {train['batch_size']} x gradient_accumulation {train['gradient_accumulation']}")
    resuming = prepare_checkpoints(checkpoints, run_fingerprint(split_path, tokens_paths, files, profile, seed=seed))

    family = load_family(files.model_name)
    padding = family.padding(files)
    model = family.build_classifier(files, labels, frozen_layers=train["frozen_layers"], seed=seed)
    engine = deepspeed_engine.initialize(model, train, precision=precision, device=device, total_steps=plan.total_steps)
    stopping = EarlyStopping.from_train(train)
    state = {"micro_batch": 0, "pending_losses": [], "history": [], "mlflow_run_id": None, "validated_at": 0,
             "best": None, "best_weights": None, "validations_without_improvement": 0, "stop_reason": None}
    if resuming:
        state = load_checkpoint(engine, checkpoints)
        LOGGER.info("resumed at optimizer step %d from %s", engine.global_steps, checkpoints)
    progress = Progress(plan.total_steps, engine.global_steps)
    run_name = f"{profile['name']}-{Path(out_model).resolve().parent.parent.name}"
    with tracked_run(tracking_uri, experiment=experiment, run_name=run_name, run_id=state["mlflow_run_id"]) as tracker:
        if state["mlflow_run_id"] is None:
            state["mlflow_run_id"] = tracker.run_id
            tracker.log_params({"profile": profile["name"], "base_model": files.model_name, "precision": precision,
                                "device": device.type, "seed": seed, "classes": len(labels), "train_cells": len(cells[TRAIN]),
                                "validation_cells": len(cells[VALIDATION]), "optimizer_steps": plan.total_steps,
                                **{f"train.{key}": value for key, value in train.items()}})
        while state["stop_reason"] is None:
            if not plan.validation_due(state):
                train_to_epoch_end(engine, cells[TRAIN], plan, seed=seed, state=state, tracker=tracker,
                                   checkpoints=checkpoints, checkpoint_every=train["checkpoint_every"], progress=progress,
                                   padding=padding)
                continue
            record = validate(engine, cells[VALIDATION], n_classes=len(labels), batch_size=train["batch_size"],
                              epoch=state["micro_batch"] / plan.batches_per_epoch, padding=padding)
            state["history"].append(record)
            state["validated_at"] = state["micro_batch"]
            tracker.log_metrics({key: record[key] for key in ("validation_loss", "validation_accuracy")}, record["step"])
            LOGGER.info("epoch %.2f: validation loss %.4f, accuracy %.4f", record["epoch"], record["validation_loss"],
                        record["validation_accuracy"])
            stopping.update(engine, record, state)
            if state["stop_reason"] is None and state["micro_batch"] >= plan.total_micro_batches:
                state["stop_reason"] = f"all {train['epochs']} epochs done"

        kept = dict(state["best"])
        LOGGER.info("%s; keeping the weights of epoch %g (step %d): validation loss %.4f, accuracy %.4f",
                    state["stop_reason"], kept["epoch"], kept["step"], kept["validation_loss"], kept["validation_accuracy"])
        mark_kept_validation(state["history"], kept)
        write_training_log(state["history"], out_log)
        metadata = {"profile": profile["name"], "label_column": label_column, "labels": labels, "seed": seed,
                    "train_cells": len(cells[TRAIN]), "validation_cells": len(cells[VALIDATION]),
                    "optimizer_steps": plan.total_steps, "steps_trained": engine.global_steps, "precision": precision,
                    "train": train, "validation_accuracy": kept["validation_accuracy"], "kept": kept,
                    "stop_reason": state["stop_reason"],
                    "mlflow_tracking_uri": resolve_tracking_uri(tracking_uri), "mlflow_run_id": tracker.run_id}
        family.save_classifier(state["best_weights"], model, files, out_model, metadata)
        tracker.log_metrics({"kept_epoch": kept["epoch"], "kept_step": kept["step"], "steps_trained": engine.global_steps})
        tracker.set_tags({"stop_reason": state["stop_reason"]})
        tracker.log_artifacts(out_model, "model")
        tracker.log_artifacts(out_log)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {**metadata, "seconds_this_session": progress.elapsed}


def load_labelled_cells(split_path: str | Path, tokens_paths: list[str | Path]) -> tuple[list[str], dict[str, LabelledCells]]:
    """The class names, and the train and validation cells of a label split (numbers only, read in blocks)."""
    labels = class_names(split_path)
    store = TokenStore(tokens_paths)
    return labels, {part: LabelledCells.read(split_path, part, labels, store) for part in (TRAIN, VALIDATION)}


def train_to_epoch_end(engine, cells: LabelledCells, plan: TrainingPlan, *, seed: int, state: dict, tracker,
                       checkpoints: str | Path, checkpoint_every: int, progress: Progress, padding: Padding) -> None:
    """Train from the position in ``state`` to the end of its epoch (or of the run).

    ``state`` is updated as training goes: the next micro-batch, losses of the open
    accumulation group, and one history record per optimizer step.
    """
    epoch, first = divmod(state["micro_batch"], plan.batches_per_epoch)
    batches = EpochBatches(cells.lengths, engine.train_micro_batch_size_per_gpu(), seed=seed, epoch=epoch)
    engine.train()
    for index in range(first, len(batches)):
        if state["micro_batch"] >= plan.total_micro_batches:
            return
        batch = batches[index]
        inputs = pad_batch(cells.fetch(batch), padding)
        logits = engine(**{name: tensor.to(engine.device) for name, tensor in inputs.items()}).logits
        targets = torch.from_numpy(cells.targets[batch].astype(np.int64)).to(engine.device)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        boundary = engine.is_gradient_accumulation_boundary()
        learning_rate = engine.get_lr()[0]  # what this step uses; stepping moves the schedule on
        engine.backward(loss)
        engine.step()
        state["micro_batch"] += 1
        state["pending_losses"].append(loss.item())
        if not boundary:
            continue
        record = {"step": engine.global_steps, "epoch": round(state["micro_batch"] / plan.batches_per_epoch, 4),
                  "train_loss": float(np.mean(state["pending_losses"])), "learning_rate": learning_rate}
        state["pending_losses"] = []
        state["history"].append(record)
        tracker.log_metrics({"train_loss": record["train_loss"], "learning_rate": record["learning_rate"]}, record["step"])
        progress.report(record)
        if engine.global_steps % checkpoint_every == 0 and engine.global_steps < plan.total_steps:
            save_checkpoint(engine, checkpoints, state)


def validate(engine, cells: LabelledCells, *, n_classes: int, batch_size: int, epoch: float, padding: Padding) -> dict:
    """Validation loss and accuracy of the model being trained, block by block (no random state is used)."""
    engine.eval()
    loss, correct = 0.0, 0
    for block in scoring_blocks(len(cells)):
        part = cells.take(block)
        probabilities = predict_proba(engine, part.fetch, part.lengths, n_classes=n_classes, batch_size=batch_size,
                                      device=engine.device, padding=padding)
        chosen = probabilities[np.arange(len(part)), part.targets]
        loss -= float(np.log(np.clip(chosen, 1e-12, None)).sum(dtype=np.float64))
        correct += int((probabilities.argmax(axis=1) == part.targets).sum())
    return {"step": engine.global_steps, "epoch": round(epoch, 4),
            "validation_loss": loss / len(cells), "validation_accuracy": correct / len(cells)}


def run_fingerprint(split_path, tokens_paths, files, profile: dict, *, seed: int) -> str:
    """What a checkpoint must have been trained on to be resumed: split, tokens, model, settings.

    The model is known by its name and its staged files: the contents of the small ones
    (configuration, vocabulary, arguments) and the sizes of the large ones (weights).
    """
    facts = {
        "split": _file_sha256(split_path),
        "tokens": sorted((Path(path).stem, Path(path).stat().st_size) for path in tokens_paths),
        "model": files.model_name,
        "model_files": {name: _file_sha256(path) if path.stat().st_size <= FINGERPRINT_FILE_BYTES else path.stat().st_size
                        for name, path in files.staged_paths().items()},
        "precision": profile["precision"],
        "train": profile["train"],
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: str | Path) -> str:
    with open(path, "rb") as handle:  # in blocks: a label split of ten million cells is large
        return hashlib.file_digest(handle, "sha256").hexdigest()


def prepare_checkpoints(checkpoints: str | Path, fingerprint: str) -> bool:
    """Return whether ``checkpoints`` holds a checkpoint of this run; otherwise start it afresh."""
    checkpoints = Path(checkpoints)
    run_file = checkpoints / RUN_FILE
    if run_file.is_file() and (checkpoints / "latest").is_file():
        if json.loads(run_file.read_text()).get("fingerprint") == fingerprint:
            return True
        LOGGER.info("discarding checkpoints of a run with other inputs or settings in %s", checkpoints)
    shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return False


def save_checkpoint(engine, checkpoints: str | Path, state: dict) -> None:
    """Save a DeepSpeed checkpoint with the loop's state and random state; keep only the newest."""
    checkpoints = Path(checkpoints)
    tag = f"step-{engine.global_steps:08d}"
    client_state = {"helixflow": {**state, "torch_rng": torch.get_rng_state(),
                                  "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    engine.save_checkpoint(str(checkpoints), tag=tag, client_state=client_state)  # writes 'latest' last
    for older in checkpoints.glob("step-*"):
        if older.name != tag:
            shutil.rmtree(older, ignore_errors=True)
    LOGGER.info("checkpoint %s", tag)


def load_checkpoint(engine, checkpoints: str | Path) -> dict:
    """Restore the newest checkpoint into ``engine``; return the loop's state."""
    path, client_state = engine.load_checkpoint(str(checkpoints))
    if path is None:
        raise HelixflowError(checkpoints, "the checkpoint could not be loaded; delete the folder to start afresh")
    saved = client_state["helixflow"]
    torch.set_rng_state(saved.pop("torch_rng"))
    cuda_rng = saved.pop("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return saved


class Progress:
    """Logs a progress line about twenty times per run, with the time per step of this session."""

    def __init__(self, total_steps: int, first_step: int) -> None:
        self.total_steps = total_steps
        self.first_step = first_step
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def report(self, record: dict) -> None:
        step = record["step"]
        if step == 1 or step == self.total_steps or step % max(1, self.total_steps // 20) == 0:
            per_step = self.elapsed / max(1, step - self.first_step)
            LOGGER.info("step %d/%d epoch %.2f loss %.4f lr %.2e (%.2f s/step)", step, self.total_steps, record["epoch"],
                        record["train_loss"], record["learning_rate"], per_step)


def mark_kept_validation(history: list[dict], kept: dict) -> None:
    """Mark each validation record of ``history`` with whether it is the ``kept`` one."""
    for record in history:
        if "validation_loss" in record:
            record["kept"] = record["step"] == kept["step"]


def write_training_log(history: list[dict], out: str | Path) -> pd.DataFrame:
    """Write the training history as a TSV, one row per optimizer step or validation."""
    log = pd.DataFrame(history).reindex(columns=LOG_COLUMNS)
    with atomic_path(out) as partial:
        log.to_csv(partial, sep="\t", index=False)
    return log
