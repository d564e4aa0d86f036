"""Resumable training stages: checkpoints of every model, optimizer and metric, and the data
position, so a killed run started again with the same command ends with the same weights.

:class:`RunContext.fit <drkeras.experiment.RunContext.fit>` gives every training stage a
:class:`StageCheckpointer` writing to ``<run>/checkpoints/<stage>/``:

- ``ckpt-<global step>.{index,data-*}``: a ``tf.train.Checkpoint`` of the model (and through it
  every sub-network), EVERY optimizer of the model (``model.optimizer`` and any optimizer held as
  an attribute, e.g. a trainer's ``g_optimizer``/``d_optimizer``; loss-scale state included), the
  state of the model's metrics (so the log of an interrupted epoch averages the whole epoch), and
  the ``tf.random.Generator`` states of random layers (Dropout, ...; Keras leaves them out of its
  own checkpoints). The last two checkpoints are kept while the stage trains.
- ``final-<global step>.{index,data-*}``: written when the stage finished, with ``keep="final"``
  (the default, ``train.keep_checkpoints``): the model's weights only (no optimizer slots, no
  metric or generator state, which nothing after a finished stage reads: every stage compiles
  its own optimizers). The stage's resumable checkpoints are then deleted, so a finished stage
  costs one copy of its weights on disk. With ``keep="all"`` no checkpoint is ever deleted and
  the final one is a full, resumable checkpoint.
- ``state.json``: which checkpoint is the latest, the epoch and step it was taken at, whether it
  holds weights only, and the per-epoch logs so far; written atomically after the checkpoint,
  so it never names a partial one.
- ``done.json``: written when the stage finished; a restarted run then restores the stage's final
  weights instead of training it again.

Checkpoints are taken every ``save_steps`` optimisation steps and at every epoch end, never after
a non-finite loss (the :class:`~drkeras.training.callbacks.NaNGuard` passed as ``guard`` keeps the
last good one). The data position is restored by :func:`resumable_data`: the stage's batches form
one stream (a finite dataset is repeated, one pass per epoch) and a resumed stage skips the
batches already consumed, so it sees exactly the batches an uninterrupted run would have seen
(the skipped part of the input pipeline runs again, without training; random augmentation that
is a function of the stream position, as in :mod:`drkeras.data.pipeline`, replays identically).

Example::

    directory = run_dir / "checkpoints" / "joint"
    data, steps, skip = resumable_data(dataset, steps_per_epoch=None)
    saver = StageCheckpointer(directory, steps_per_epoch=steps, save_steps=100)
    if saver.finished:
        saver.restore_now(model)
    else:
        model.fit(data.skip(saver.global_step) if skip else data, steps_per_epoch=steps,
                  epochs=10, initial_epoch=saver.epoch, callbacks=[saver])
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

__all__ = [
    "DEFAULT_SAVE_STEPS",
    "KEEP_POLICIES",
    "StageCheckpointer",
    "optimizers_of",
    "random_generators_of",
    "resumable_data",
    "write_json_atomic",
]

log = logging.getLogger("drkeras")

# Often enough that a crash costs minutes, rarely enough that writing a VGG16-UNet with its Adam
# state (a few hundred MB) stays a small fraction of the training time.
DEFAULT_SAVE_STEPS = 500
STATE_FILE = "state.json"
DONE_FILE = "done.json"
# What a finished stage keeps (``train.keep_checkpoints``): its final weights, or everything.
KEEP_POLICIES = ("final", "all")

_OPTIMIZER_TYPES = (
    tf.keras.optimizers.Optimizer,
    tf.keras.optimizers.legacy.Optimizer,
    tf.keras.mixed_precision.LossScaleOptimizer,
)


def write_json_atomic(path, payload) -> pathlib.Path:
    """Write ``payload`` as JSON to ``path`` through a temporary file and an atomic rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def optimizers_of(model: tf.keras.Model) -> Dict[str, tf.keras.optimizers.Optimizer]:
    """Every optimizer a model holds: ``model.optimizer`` and optimizer-valued attributes.

    Trainers keep one optimizer per agent (``model_optimizer``, ``label_optimizer``,
    ``g_optimizer``, ...); all of them have state (moments, iteration counts, loss scales) that a
    resumed run must restore. Keys are attribute names, so they are stable across processes.

    Example::

        sorted(optimizers_of(trainer))   # ['label_optimizer', 'model_optimizer', 'optimizer']
    """
    found: Dict[str, tf.keras.optimizers.Optimizer] = {}
    main = getattr(model, "optimizer", None)
    if isinstance(main, _OPTIMIZER_TYPES):
        found["optimizer"] = main
    for name, value in sorted(vars(model).items()):
        if isinstance(value, _OPTIMIZER_TYPES) and name != "optimizer":
            found[name.lstrip("_")] = value
    return found


def random_generators_of(model: tf.keras.Model) -> Dict[str, tf.random.Generator]:
    """The ``tf.random.Generator`` of every random layer (Dropout, GaussianNoise, ...).

    Keras deliberately leaves these out of checkpoints; a resumed run needs them to draw the
    same dropout masks as an uninterrupted one. Only layers built while
    ``tf.keras.backend.experimental.enable_tf_random_generator()`` is on have one (the runner
    turns it on); layers using legacy stateful random ops have no state to save.
    """
    found = {}
    for index, layer in enumerate(model.submodules):
        generator = getattr(getattr(layer, "_random_generator", None), "_generator", None)
        if isinstance(generator, tf.random.Generator):
            found[f"{index}_{getattr(layer, 'name', 'layer')}"] = generator
    return found


def _metrics_of(model: tf.keras.Model) -> Dict[str, tf.keras.metrics.Metric]:
    found = {}
    for metric in model.metrics:
        name = metric.name
        while name in found:
            name += "_"
        found[name] = metric
    return found


def _checkpoint(model: tf.keras.Model, *, with_metrics: bool = True) -> tf.train.Checkpoint:
    """The stage checkpoint; built at each save/restore because Keras creates optimizer slots
    and compiled metrics lazily, at the first trace of the train step."""
    parts = {"model": model}
    optimizers = optimizers_of(model)
    if optimizers:
        parts["optimizers"] = tf.train.Checkpoint(**optimizers)
    generators = random_generators_of(model)
    if generators:
        parts["random"] = tf.train.Checkpoint(**generators)
    metrics = _metrics_of(model) if with_metrics else {}
    if metrics:
        parts["metrics"] = tf.train.Checkpoint(**metrics)
    return tf.train.Checkpoint(**parts)


def _weights_checkpoint(model: tf.keras.Model) -> tf.train.Checkpoint:
    """A finished stage's checkpoint: the model's weights (every sub-network's), in the model's
    own order, and nothing else. ``tf.train.Checkpoint(model=model)`` would not do: a compiled
    Keras model tracks its optimizer, so its slots would be saved too."""
    return tf.train.Checkpoint(weights=list(model.weights))


def resumable_data(data, steps_per_epoch: Optional[int]) -> Tuple[object, Optional[int], bool]:
    """The stage's training data as ONE stream, so a batch count is a data position.

    Keras re-creates its iterator each epoch when ``steps_per_epoch`` is absent (or equals the
    dataset's length); a restarted process cannot continue such a sequence of iterators (a
    reshuffling dataset draws each epoch's order from state the iterators do not save). A finite
    dataset of known length is therefore repeated, ``steps_per_epoch`` defaulting to its length:
    the same batches, epoch after epoch, through one iterator, which :class:`StageCheckpointer`
    positions with ``skip``.

    Args:
        data: what ``fit`` receives (a ``tf.data.Dataset`` for an exact data position).
        steps_per_epoch: the stage's steps per epoch, or ``None`` for one pass over ``data``.

    Returns:
        ``(data, steps_per_epoch, exact)``; ``exact`` is False when the position cannot be
        restored (not a ``tf.data.Dataset``, or one of unknown length without
        ``steps_per_epoch``): a resumed epoch then restarts its data from the beginning.

    Raises:
        ValueError: an empty dataset, or an infinite one without ``steps_per_epoch``.
    """
    if not isinstance(data, tf.data.Dataset):
        return data, steps_per_epoch, False
    length = int(data.cardinality())
    if length == 0:
        raise ValueError("the training dataset is empty (cardinality 0)")
    if length == tf.data.INFINITE_CARDINALITY:
        if not steps_per_epoch:
            raise ValueError(
                "the training dataset repeats forever: give steps_per_epoch "
                "(train.steps_per_epoch or ctx.fit(..., steps_per_epoch=N))"
            )
        return data, steps_per_epoch, True
    if length == tf.data.UNKNOWN_CARDINALITY:
        return data, steps_per_epoch, bool(steps_per_epoch)
    if not steps_per_epoch or steps_per_epoch == length:
        return data.repeat(), length, True
    return data, steps_per_epoch, True


class StageCheckpointer(tf.keras.callbacks.Callback):
    """Save a training stage periodically and resume it where it stopped (module docstring).

    Construct it before ``fit``: it reads ``directory`` and exposes where to resume
    (``epoch``, ``step``, ``global_step``, ``finished``). During ``fit`` it

    1. tells Keras the first epoch and step (the hook Keras' own ``BackupAndRestore`` uses),
    2. restores the checkpoint just before the first train step, after the step function is
       traced, so optimizer slots and compiled metrics exist and are restored exactly,
    3. saves every ``save_steps`` steps, at each epoch end, and at the end (``done.json``).

    Args:
        directory: the stage's checkpoint folder (created).
        steps_per_epoch: steps of a full epoch (``None`` when unknown).
        save_steps: save every this many steps (0: only at epoch ends).
        guard: a :class:`~drkeras.training.callbacks.NaNGuard`; nothing is saved once it has
            recorded a failure, so the last good checkpoint survives a diverged run.
        keep: ``"final"`` (a finished stage keeps its final weights only) or ``"all"`` (every
            checkpoint is kept, the final one with its optimizer states).

    Put it after callbacks that change the model or optimizer at epoch end (learning-rate
    schedules): the epoch-end checkpoint must see their changes. The internal state of other
    callbacks (early stopping counters) is not saved.
    """

    def __init__(
        self,
        directory,
        *,
        steps_per_epoch: Optional[int],
        save_steps: int = DEFAULT_SAVE_STEPS,
        guard=None,
        keep: str = "final",
    ):
        super().__init__()
        if keep not in KEEP_POLICIES:
            raise ValueError(f"keep={keep!r}: expected one of {', '.join(KEEP_POLICIES)}")
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.steps_per_epoch = steps_per_epoch
        self.save_steps = int(save_steps)
        self.guard = guard
        self.keep = keep
        state = self._read(STATE_FILE) or {}
        self.weights_only = bool(state.get("weights_only", False))
        # Final weights are written only after the stage's last step: done.json may be all
        # that a kill at the very end left unwritten.
        self.finished = bool(state.get("checkpoint")) and (
            (self.directory / DONE_FILE).is_file() or self.weights_only
        )
        self.checkpoint_name: Optional[str] = state.get("checkpoint")
        if self.checkpoint_name and not self._exists(self.checkpoint_name):
            raise FileNotFoundError(
                f"{self.directory / STATE_FILE} names checkpoint {self.checkpoint_name!r}, which "
                f"is missing; delete {self.directory} (or run with --fresh) to start the stage "
                "again"
            )
        self.epoch = int(state.get("epoch", 0))
        self.step = int(state.get("step", 0))
        self.global_step = int(state.get("global_step", 0))
        self.history: List[dict] = list(state.get("history", []))[: self.epoch]
        self._pending_restore = self.checkpoint_name is not None
        self._original_train_function = None
        self._epoch_base = self.global_step - self.step
        self._current_epoch = self.epoch
        self._current_step = self.step
        self._saved_at: Optional[Tuple[int, int]] = (
            (self.epoch, self.step) if self.checkpoint_name else None
        )

    # ---------------------------------------------------------------------------- files

    def _read(self, name: str) -> Optional[dict]:
        path = self.directory / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON ({err}); delete {self.directory} (or run with --fresh)"
            ) from None

    def _exists(self, name: str) -> bool:
        return (self.directory / f"{name}.index").is_file()

    @property
    def resuming(self) -> bool:
        """True when a checkpoint of an unfinished stage will be restored at the first step."""
        return self.checkpoint_name is not None and not self.finished

    @property
    def latest_checkpoint(self) -> Optional[pathlib.Path]:
        """Prefix of the latest good checkpoint, or ``None``."""
        return self.directory / self.checkpoint_name if self.checkpoint_name else None

    def describe(self) -> str:
        """Where the latest checkpoint was taken (for log and error messages)."""
        if not self.checkpoint_name:
            return f"no checkpoint in {self.directory}"
        return (
            f"{self.latest_checkpoint} (epoch {self._saved_at[0] + 1}, step {self._saved_at[1]})"
            if self._saved_at[1]
            else f"{self.latest_checkpoint} (end of epoch {self._saved_at[0]})"
        )

    # ---------------------------------------------------------------------------- restore

    def restore_now(self, model: tf.keras.Model, data=None) -> None:
        """Restore the latest checkpoint into ``model`` outside ``fit`` (a finished stage).

        With ``data`` (the stage's ``tf.data.Dataset``) the train step is traced first, without
        running it, so every optimizer slot exists and is restored now; otherwise slots are
        restored when the optimizer creates them.
        """
        if not self.checkpoint_name:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        if self.weights_only:
            status = _weights_checkpoint(model).read(str(self.latest_checkpoint))
            self._check(status.assert_consumed, model)
            return
        traced = False
        if isinstance(data, tf.data.Dataset):
            strategy = model.distribute_strategy
            with strategy.scope():
                function = model.make_train_function()
                trace = getattr(function, "get_concrete_function", None)
                if trace is not None:
                    trace(iter(strategy.experimental_distribute_dataset(data)))
                    traced = True
        status = _checkpoint(model, with_metrics=traced).read(str(self.latest_checkpoint))
        if not traced:
            status.expect_partial()
        self._check(status.assert_existing_objects_matched, model)

    def _check(self, assertion, model) -> None:
        try:
            assertion()
        except (AssertionError, ValueError) as err:
            raise ValueError(
                f"checkpoint {self.latest_checkpoint} does not match model {model.name!r} "
                f"(was the experiment's code or config changed?): {err}; delete "
                f"{self.directory} (or run with --fresh) to train the stage again"
            ) from None

    def _restore_before_first_step(self, iterator) -> None:
        trace = getattr(self._original_train_function, "get_concrete_function", None)
        if trace is not None:
            # Tracing creates the optimizer slots and compiled metrics without running a step.
            trace(iterator)
        # Metric states matter mid-epoch only; at an epoch start Keras has just reset them.
        mid_epoch = self.step > 0
        status = _checkpoint(self.model, with_metrics=mid_epoch).read(str(self.latest_checkpoint))
        if not mid_epoch:
            status.expect_partial()
        self._check(status.assert_existing_objects_matched, self.model)
        log.info("resumed from %s", self.describe())

    def _train_function(self, iterator):
        if self._pending_restore:
            self._pending_restore = False
            self._restore_before_first_step(iterator)
        return self._original_train_function(iterator)

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch, initial_epoch, mode=None):
        """Keras' resume hook (``Model._training_state``): the first epoch and step to run."""
        if self.resuming:
            return self.epoch, self.step
        return initial_epoch, 0

    # ---------------------------------------------------------------------------- save

    def _save(self, epoch: int, step: int) -> None:
        if self.guard is not None and self.guard.failure:
            return
        if self._saved_at == (epoch, step) and self.checkpoint_name:
            return
        name = f"ckpt-{self.global_step}"
        _checkpoint(self.model).write(str(self.directory / name))
        previous = self.checkpoint_name
        self.checkpoint_name, self._saved_at = name, (epoch, step)
        write_json_atomic(
            self.directory / STATE_FILE,
            {
                "checkpoint": name,
                "epoch": epoch,
                "step": step,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch,
                "history": self.history,
            },
        )
        self._prune({name, previous})

    def _finish(self) -> None:
        """Keep the final weights (``keep="final"``) or the full final checkpoint, mark the
        stage done, and delete what a finished stage no longer needs."""
        if self.keep == "final":
            name = f"final-{self.global_step}"
            _weights_checkpoint(self.model).write(str(self.directory / name))
            self.checkpoint_name, self.weights_only = name, True
            write_json_atomic(
                self.directory / STATE_FILE,
                {
                    "checkpoint": name,
                    "weights_only": True,
                    "epoch": self._current_epoch,
                    "step": self._current_step,
                    "global_step": self.global_step,
                    "steps_per_epoch": self.steps_per_epoch,
                    "history": self.history,
                },
            )
        else:
            self._save(self._current_epoch, self._current_step)
        write_json_atomic(
            self.directory / DONE_FILE,
            {"checkpoint": self.checkpoint_name, "global_step": self.global_step},
        )
        self.finished = True
        self._prune({self.checkpoint_name})

    def _prune(self, keep) -> None:
        if self.keep == "all":
            return
        for index in self.directory.glob("*-*.index"):
            stem = index.name[: -len(".index")]
            if stem not in keep:
                for part in self.directory.glob(stem + ".*"):
                    part.unlink()

    # ---------------------------------------------------------------------------- callbacks

    def on_train_begin(self, logs=None):
        model = self.model
        # Keras asks `_training_state` for the first (epoch, step) right after this callback.
        model._training_state = self
        self._original_train_function = model.train_function
        model.train_function = self._train_function

    def detach(self) -> None:
        """Undo the hooks of ``on_train_begin`` (also after ``fit`` raised)."""
        model = self.model
        if model is None or self._original_train_function is None:
            return
        if getattr(model, "_training_state", None) is self:
            model._training_state = None
        if model.train_function == self._train_function:  # bound methods: equal, not identical
            model.train_function = self._original_train_function
        self._original_train_function = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self._current_epoch:
            self._epoch_base = self.global_step
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._current_step = batch + 1
        self.global_step = self._epoch_base + self._current_step
        due = self.save_steps > 0 and self.global_step % self.save_steps == 0
        # The epoch-end checkpoint follows the last step anyway.
        if due and self._current_step != self.steps_per_epoch:
            self._save(self._current_epoch, self._current_step)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure:
            return
        entry = {k: float(v) for k, v in (logs or {}).items()}
        self.history = self.history[:epoch] + [entry]
        self._epoch_base = self.global_step
        self._current_epoch, self._current_step = epoch + 1, 0
        self._save(epoch + 1, 0)

    def on_train_end(self, logs=None):
        self.detach()
        if self.guard is not None and self.guard.failure:
            return
        if self._pending_restore:
            # No step ran (the checkpoint was taken after the last epoch): restore it anyway.
            self._pending_restore = False
            self.restore_now(self.model)
        self._finish()

    def history_dict(self) -> Dict[str, list]:
        """The stage's per-epoch logs so far (all epochs, across restarts), Keras style."""
        keys: List[str] = []
        for entry in self.history:
            keys += [k for k in entry if k not in keys]
        return {k: [e.get(k, math.nan) for e in self.history] for k in keys}
