"""Keras callbacks shared by the experiments: one ``history.csv`` across stages, NaN guard."""

from __future__ import annotations

import csv
import math
import pathlib

import tensorflow as tf


class TrainingDiverged(RuntimeError):
    """Raised by the runner when a loss became NaN or infinite."""


class HistoryCSV(tf.keras.callbacks.Callback):
    """Append one row per epoch to a run's ``history.csv``, shared by every training stage.

    Columns are ``stage``, ``epoch`` and the union of the log keys seen so far; the file is
    rewritten when a stage brings new keys, so earlier rows keep their values and gain empty
    cells. Unlike ``CSVLogger``, several stages (pretraining, multi-task, baselines) share one file.
    An epoch logged again (a resumed run repeating the epoch it was killed in) replaces its row.
    """

    def __init__(self, path, stage: str):
        super().__init__()
        self.path = pathlib.Path(path)
        self.stage = stage

    def _read(self):
        if not self.path.exists():
            return [], []
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)

    def on_epoch_end(self, epoch, logs=None):
        row = {"stage": self.stage, "epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        columns, rows = self._read()
        rows = [r for r in rows if (r.get("stage"), r.get("epoch")) != (self.stage, str(epoch + 1))]
        for key in row:
            if key not in columns:
                columns.append(key)
        rows.append(row)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)


class NaNGuard(tf.keras.callbacks.Callback):
    """Stop training at the first non-finite loss and remember where it happened.

    The runner turns a recorded failure into :class:`TrainingDiverged` with a message naming
    the stage, epoch, batch and log key, instead of letting NaN weights flow into evaluation.
    """

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage
        self.failure = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for key, value in (logs or {}).items():
            if key.endswith("loss") and not math.isfinite(float(value)):
                self.failure = (
                    f"stage {self.stage!r}: {key} became {float(value)} at epoch "
                    f"{self._epoch + 1}, batch {batch + 1}; lower the learning rate "
                    "(--set optimizers.<name>.learning_rate=...) or check the input data"
                )
                self.model.stop_training = True
                return
