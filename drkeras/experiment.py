"""The shared experiment runner behind every ``experiments/<paper>.py`` (docs/design.md section 3).

An experiment file declares an :class:`Experiment`: its name, the paper it reproduces, its
presets (:class:`drkeras.config.Config` values named ``smoke`` and ``paper``) and ``prepare``,
which returns the run: ``stages()``, every stage declared before anything trains
(:class:`drkeras.stages.Stage`), and ``report()``, the paper's tables as
:class:`drkeras.results.ResultsTable` objects (with figures and exports). :func:`main` does the
rest for every paper:

1. parse ``--data --preset --set --strategy --out --seed --fresh --dry-run --random-weights``;
2. resolve the config, pick the device strategy, seed everything, set the precision policy;
3. create the run directory (a worker of a multi-worker run other than the chief uses
   ``<out>/workers/<type>_<index>``) and save ``config.json``;
4. check the pretrained weights (:mod:`drkeras.weights`), declare the stages, write and check
   the resource plan (``plan.json``; :func:`plan_stages`), then execute the stages in order
   (:meth:`RunContext.execute`: datasets built once and released after their last stage;
   ``ctx.fit`` gives every training stage a Keras progress bar, a shared ``history.csv``,
   TensorBoard logs, a NaN guard and checkpoints to resume from), and report;
5. write ``results.csv`` / ``results.md`` (our numbers beside the paper's) and print the tables;
   a dry run also writes ``dry_run.json``.

Resuming: run the SAME command again after a crash (or a kill) and the run continues where it
stopped. Each ``ctx.fit`` stage checkpoints its model, every optimizer, its metrics and its data
position in ``<out>/checkpoints/<stage>`` (:mod:`drkeras.training.checkpoint`); a finished stage
keeps only its final weights (``train.keep_checkpoints=all`` keeps every checkpoint; ``none``
deletes them all once the run has completed) and is not trained again (its final weights are
restored), an unfinished one continues from its latest checkpoint, mid-epoch, with the batches
an uninterrupted run would have seen; on CPU with ``train.deterministic`` it ends with the same
weights. A run directory with checkpoints only resumes the config it was started with
(``train.verbose`` may differ); ``--fresh`` deletes the checkpoints and history and starts over.

Example (an experiment file; tests/tiny_experiment.py is a complete one)::

    class MyPaper(Experiment):
        name = "mypaper"
        title = "My paper (2020)"
        presets = {"smoke": Config(method=Method()), "paper": Config(method=Method(), ...)}

        def prepare(self, ctx):
            return MyRun(ctx)   # .stages() -> [Stage(...), ...], .report() -> [ResultsTable]

    if __name__ == "__main__":
        raise SystemExit(main(MyPaper()))
"""

from __future__ import annotations

import abc
import argparse
import collections
import gc
import json
import logging
import pathlib
import re
import shutil
import sys
import time
import zlib
from typing import Any, Dict, Mapping, Optional, Protocol, Sequence

import drkeras.startup

import tensorflow as tf

from drkeras import stages as staging
from drkeras.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_dict,
    resolve_preset,
    save_config,
)
from drkeras.stages import Stage
from drkeras.training import checkpoint, determinism, distribute
from drkeras.training.callbacks import HistoryCSV, NaNGuard, TrainingDiverged

log = logging.getLogger("drkeras")

SYNTHETIC = "synthetic"

# The experiments of this repository: name -> "module:class".
EXPERIMENTS = {
    "pldmlt": "experiments.pldmlt:PLDMLT",
    "mtunet": "experiments.mtunet:MTUnetExperiment",
    "collaborative": "experiments.collaborative:Collaborative",
    "ssl_gan": "experiments.ssl_gan:SSLGAN",
    "cooperative": "experiments.cooperative:JointSegExperiment",
}


def load_experiment(name: str) -> Experiment:
    """An instance of the experiment called ``name`` (a key of :data:`EXPERIMENTS`)."""
    import importlib

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose among {sorted(EXPERIMENTS)}")
    module, cls = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


class StagedRun(Protocol):
    """What :meth:`Experiment.prepare` returns: the run's declared stages and its report."""

    def stages(self) -> Sequence[Stage]:
        """Every stage of the run, in order, declared before any of them runs."""

    def report(self) -> Sequence:
        """After the stages: the paper's tables (``ResultsTable``), figures and export."""


class Experiment(abc.ABC):
    """Base class of the papers' experiments; subclasses set the attributes and ``prepare``."""

    name: str = ""
    title: str = ""
    presets: Mapping[str, Config] = {}

    @abc.abstractmethod
    def prepare(self, ctx: RunContext) -> StagedRun:
        """The run's stages and report (nothing may be built or trained here: the runner
        plans from the declarations first)."""

    def pretrained_weights(self, config: Config) -> list:
        """The pretrained weight files (:class:`drkeras.weights.WeightFile`) the networks of
        ``config`` load, each naming the config key that asks for it; none by default.
        ``python -m drkeras.weights`` lists and downloads them, the runner checks them before
        the first stage (:func:`drkeras.weights.ensure_available`)."""
        return []


class RunContext:
    """What an experiment's ``run`` gets from the runner.

    Attributes:
        config: the resolved :class:`Config` of the run.
        out_dir: the run directory (``config.json``, ``history.csv``, results, plots, ``export/``,
            ``checkpoints/``); a multi-worker run's non-chief workers get their own.
        strategy: the ``tf.distribute`` strategy; build models/optimizers/metrics in its scope.
        role: this process's :class:`~drkeras.training.distribute.WorkerRole`.
    """

    def __init__(
        self,
        config: Config,
        out_dir: pathlib.Path,
        strategy: tf.distribute.Strategy,
        role: Optional[distribute.WorkerRole] = None,
    ):
        self.config = config
        self.out_dir = pathlib.Path(out_dir)
        self.strategy = strategy
        self.role = role or distribute.WorkerRole()
        self.history_path = self.out_dir / "history.csv"
        self._records = {}
        self._stages = collections.Counter()
        # Declared stages (``execute``): the current one, its live datasets, where they cache.
        self.dry_run = 0  # steps per batch size of a dry run (0: a real run)
        self.cache: Dict[str, Any] = {}
        self.plan: Optional[dict] = None
        self.dry_stages: list = []
        self._stage: Optional[Stage] = None
        self._live: Dict[str, Any] = {}
        self._meter = staging.MemoryMeter()
        self._tensor_meter = staging.TensorMemoryMeter()

    @property
    def checkpoint_dir(self) -> pathlib.Path:
        return self.out_dir / "checkpoints"

    @property
    def is_chief(self) -> bool:
        """False on the non-chief workers of a multi-worker run (they should not export)."""
        return self.role.is_chief

    @property
    def export_dir(self) -> pathlib.Path:
        return self.out_dir / "export"

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def records(self, dataset: str) -> pathlib.Path:
        """The converted records directory of ``dataset`` (``idrid``, ``ddr``, ``eyepacs``, ...).

        With ``--data synthetic`` the dataset's real on-disk layout is generated once per run
        under ``out_dir/data/raw/<dataset>`` and converted by the real converter
        (``python -m data_prep <dataset>``) into ``out_dir/data/records/<dataset>``, so synthetic
        data takes exactly the code path of the real datasets. Otherwise ``--data ROOT`` must
        hold ``ROOT/<dataset>`` as written by
        ``python -m data_prep <dataset> --src RAW --out ROOT/<dataset>``.
        """
        if dataset in self._records:
            return self._records[dataset]
        data = self.config.data
        if data.source == SYNTHETIC:
            path = synthetic_records(dataset, self.out_dir / "data", data, self.config.seed)
        else:
            path = pathlib.Path(data.source) / dataset
            if not (path / "manifest.json").is_file():
                raise FileNotFoundError(
                    f"no converted {dataset} records in {path} (expected {path}/manifest.json); "
                    f"convert the raw dataset first: python -m data_prep {dataset} --src RAW "
                    f"--out {path}"
                )
        self._records[dataset] = path
        return path

    # ------------------------------------------------------------------ declared stages

    @property
    def stage(self) -> Optional[Stage]:
        """The stage being executed (``None`` outside :meth:`execute`)."""
        return self._stage

    def data(self, key: str):
        """The dataset ``key`` declared by the current stage, built on first use with the cache
        the runner chose for it (``data.cache``) and kept until the last stage declaring it
        ends."""
        stage = self._stage
        spec = next((d for d in stage.data if d.key == key), None) if stage else None
        if spec is None:
            where = f"stage {stage.name!r}" if stage else "no stage (ctx.execute runs stages)"
            declared = [d.key for d in stage.data] if stage else []
            raise KeyError(f"dataset {key!r} is not declared by {where}; declared: {declared}")
        if key not in self._live:
            where = self.cache.get(key, spec.cached)
            if isinstance(where, str):
                pathlib.Path(where).parent.mkdir(parents=True, exist_ok=True)
            self._live[key] = spec.build(where)
        return self._live[key]

    def execute(self, declared: Sequence[Stage]) -> Dict[str, Any]:
        """Run the declared stages in order; returns the outputs nobody consumed.

        Each stage's ``run`` gets the outputs of the stages it consumes. After a stage, the
        datasets no later stage declares are released (file caches deleted), and so are the
        outputs no later stage consumes except the last stage's. In a dry run
        (``self.dry_run``) only the first stage of each group trains; the others build their
        datasets and take one batch (and stages consuming a skipped stage are skipped too).
        """
        staging.check_stages(declared)
        data_last, output_last = staging.last_use(declared)
        outputs: Dict[str, Any] = {}
        skipped, groups = set(), set()
        for index, stage in enumerate(declared):
            skip = self.dry_run and (stage.group in groups or skipped & set(stage.consumes))
            record = {"stage": stage.name, "group": stage.group, "trained": not skip}
            gc.collect()
            self._meter.reset()
            before, start = self._meter.current(), time.time()
            self._stage = stage
            try:
                if skip:
                    skipped.add(stage.name)
                    for spec in stage.data:
                        next(iter(self.data(spec.key)))
                    log.info("stage %s: dry run, data built, not trained (group %s ran)",
                             stage.name, stage.group)  # fmt: skip
                else:
                    groups.add(stage.group)
                    log.info("stage %s (%d/%d)", stage.name, index + 1, len(declared))
                    inputs = {name: outputs.get(name) for name in stage.consumes}
                    outputs[stage.name] = stage.run(inputs)
            finally:
                self._stage = None
            for key in [k for k, last in data_last.items() if last == index]:
                self._release(key)
            for name in list(outputs):
                if output_last.get(name, -1) <= index and name != stage.name:
                    outputs.pop(name)
            if stage.name not in output_last and index < len(declared) - 1:
                outputs.pop(stage.name, None)
            gc.collect()
            staging.return_free_memory()
            record.update(
                seconds=round(time.time() - start, 2),
                host_rss_before_gb=round(before / staging.GB, 3),
                host_rss_peak_gb=round(self._meter.peak() / staging.GB, 3),
                host_rss_after_gb=round(self._meter.current() / staging.GB, 3),
            )
            if self.dry_run:
                self._merge_dry(stage.name, record)
        return outputs

    def _release(self, key: str) -> None:
        self._live.pop(key, None)
        where = self.cache.get(key)
        if isinstance(where, str):
            for path in pathlib.Path(where).parent.glob(pathlib.Path(where).name + "*"):
                path.unlink(missing_ok=True)

    def _merge_dry(self, stage: str, record: dict) -> None:
        for entry in self.dry_stages:
            if entry["stage"] == stage:
                entry.update(record)
                return
        self.dry_stages.append(record)

    def callbacks(self, stage: str, *, tensorboard: bool = True) -> list:
        """Callbacks for one training stage: history.csv, TensorBoard and the NaN guard."""
        cbs = [HistoryCSV(self.history_path, stage), NaNGuard(stage)]
        if tensorboard:
            cbs.append(
                tf.keras.callbacks.TensorBoard(
                    str(self.out_dir / "tensorboard" / stage), write_graph=False, profile_batch=0
                )
            )
        return cbs

    def fit(
        self,
        model: tf.keras.Model,
        data,
        *,
        stage: Optional[str] = None,
        epochs: Optional[int] = None,
        steps_per_epoch: Optional[int] = None,
        callbacks: Sequence = (),
        checkpoint_steps: Optional[int] = None,
        **kwargs,
    ):
        """``model.fit`` of one training stage, resumable, with the run's callbacks.

        Args:
            model: a compiled model or trainer, built in ``ctx.strategy.scope()`` (checked).
            data: the training data; a ``tf.data.Dataset`` of GLOBAL batches for an exact
                resume (a finite one is repeated, ``steps_per_epoch`` defaulting to its length;
                see :func:`drkeras.training.checkpoint.resumable_data`).
            stage: default: the name of the declared stage being executed. The name gives its
                rows in ``history.csv``, its TensorBoard folder and
                its checkpoints ``checkpoints/<stage>`` (characters other than letters, digits,
                ``_.-`` become ``_``; a name used again in the same run gets ``_2``, ``_3``, ...
                in the order of the calls).
            epochs, steps_per_epoch: default ``train.epochs`` and ``train.steps_per_epoch``
                (0 = one pass over ``data``).
            callbacks: more Keras callbacks (run before the checkpointer).
            checkpoint_steps: checkpoint every this many steps besides every epoch end
                (0 = epoch ends only; default ``train.checkpoint_steps``).
            **kwargs: passed to ``model.fit`` (``validation_data``, ``class_weight``, ...).

        Resume contract: a stage that finished in an earlier run with this run directory is
        not trained again: its final weights are restored and its history returned (its
        optimizers are not: every stage compiles its own). An unfinished stage restarts from
        its latest checkpoint at the epoch and step it was taken, with the model, every
        optimizer, the metric states, the random layers' generator states and the data
        position restored. ``train.jit_compile`` turns
        on XLA for the model's train step. Afterwards the random seed is reset from
        ``(seed, stage)``, so what follows starts from the same random state whether the
        stage trained or was restored.

        Returns:
            a ``History`` of all the stage's epochs (across restarts).

        Raises:
            TrainingDiverged: a loss became NaN or infinite; the message names where, and the
                last good checkpoint is kept.
            NondeterministicOps: op determinism is on, a GPU is visible, and the traced train
                step holds ops without a deterministic GPU kernel (checked before training;
                :mod:`drkeras.training.determinism`).
        """
        if "initial_epoch" in kwargs:
            raise TypeError("ctx.fit() sets initial_epoch itself (it resumes stages); drop it")
        train = self.config.train
        epochs = epochs if epochs is not None else train.epochs
        steps = steps_per_epoch if steps_per_epoch is not None else train.steps_per_epoch
        if checkpoint_steps is None:
            checkpoint_steps = train.checkpoint_steps
        distribute.check_built_in_scope(model, self.strategy)
        if train.jit_compile and not model.jit_compile:
            model.jit_compile = True
        data, steps, exact = checkpoint.resumable_data(data, steps or None)
        stage = self._unique_stage(stage or (self._stage.name if self._stage else "stage"))
        if self.dry_run:
            return self._dry_fit(model, data, stage, callbacks, kwargs)
        cbs = self.callbacks(stage) + list(callbacks)
        guard = next(cb for cb in cbs if isinstance(cb, NaNGuard))
        saver = checkpoint.StageCheckpointer(
            self.checkpoint_dir / stage,
            steps_per_epoch=steps,
            save_steps=checkpoint_steps,
            guard=guard,
            keep="all" if train.keep_checkpoints == "all" else "final",
        )
        if saver.finished:
            saver.restore_now(model, data)
            log.info("stage %s: finished in an earlier run; restored %s", stage, saver.describe())
        else:
            if saver.resuming:
                log.info("stage %s: resuming from %s", stage, saver.describe())
                if exact:
                    data = data.skip(saver.global_step)
                else:
                    log.warning(
                        "stage %s: the data position cannot be restored (pass a tf.data.Dataset "
                        "of known length, or steps_per_epoch); epoch %d restarts its data",
                        stage,
                        saver.epoch + 1,
                    )
            if _op_determinism_enabled() and tf.config.list_logical_devices("GPU"):
                determinism.check_model(model, data, stage=stage)
            log.info("stage %s: training", stage)
            try:
                model.fit(
                    data,
                    epochs=epochs,
                    initial_epoch=saver.epoch,
                    steps_per_epoch=steps,
                    callbacks=cbs + [saver],
                    verbose=train.verbose,
                    **kwargs,
                )
            finally:
                saver.detach()
            if guard.failure:
                kept = (
                    f"the last good checkpoint is kept: {saver.describe()}"
                    if saver.checkpoint_name
                    else "no checkpoint was taken before it"
                )
                raise TrainingDiverged(f"{guard.failure}; {kept}")
        seed = zlib.crc32(f"{self.config.seed}:{stage}".encode()) % (2**31)
        tf.keras.utils.set_random_seed(seed)
        history = tf.keras.callbacks.History()
        history.set_model(model)
        history.history = saver.history_dict()
        history.epoch = list(range(len(saver.history)))
        return history

    def _dry_fit(self, model, data, stage: str, callbacks, kwargs):
        """A dry run's ``fit``: ``self.dry_run`` steps at per-replica batch 1, then at 2, each
        timed, with the peaks of TensorFlow's allocator and of resident memory from the second
        step on (the first step alone when there is one); the traced train step is searched
        for ops without a deterministic GPU kernel. Nothing is checkpointed."""
        declared = self._stage.data if self._stage else ()
        rebatch = next((d.rebatch for d in declared if d.train and d.rebatch), None) or _rebatch
        batches = {}
        history = None
        for per_replica in (1, 2):
            if per_replica == 2:
                reason = self._batch_two_does_not_fit(stage)
                if reason:
                    log.warning("dry run, stage %s: batch 2 not stepped: %s", stage, reason)
                    batches["2"] = {"skipped": reason}
                    continue
            stream = rebatch(data, per_replica * self.replicas)
            gc.collect()
            self._meter.reset()
            self._tensor_meter.reset()
            # memory is measured from the second step on: the first also creates the
            # optimizer's slots and runs once-only work, which batch 2 would not repeat
            timer = _StepTimer(after_first=self._reset_meters if self.dry_run > 1 else None)
            try:
                history = model.fit(
                    stream,
                    epochs=1,
                    steps_per_epoch=self.dry_run,
                    callbacks=self.callbacks(stage, tensorboard=False) + list(callbacks) + [timer],
                    verbose=self.config.train.verbose,
                    **kwargs,
                )
            except tf.errors.ResourceExhaustedError as err:
                if per_replica == 1:
                    raise
                first_line = err.message.splitlines()[0][:160]
                reason = f"out of memory at batch 2 ({first_line}); {_FROM_PLAN}"
                log.warning("dry run, stage %s: %s", stage, reason)
                batches["2"] = {"skipped": reason}
                continue
            batches[str(per_replica)] = {
                "step_seconds": [round(t, 3) for t in timer.seconds],
                "peak_rss_gb": round(self._meter.peak() / staging.GB, 3),
                "peak_tensor_gb": round(self._tensor_meter.peak() / staging.GB, 4),
            }
        one = batches["1"]["step_seconds"]
        two = batches["2"].get("step_seconds")
        record = {
            "fit": stage,
            "steps_per_batch_size": self.dry_run,
            "trace_seconds": round(one[0] - (min(one[1:]) if len(one) > 1 else 0.0), 3),
            "seconds_per_step": {
                "1": min(one[1:]) if len(one) > 1 else one[0],
                **({"2": min(two)} if two else {}),
            },
            "batches": batches,
            "gpu_nondeterministic_ops": [f.describe() for f in _traced_findings(model, stream)],
        }
        owner = self._stage.name if self._stage else stage
        for entry in self.dry_stages:
            if entry["stage"] == owner:
                entry.setdefault("fits", []).append(record)
                break
        else:
            self.dry_stages.append({"stage": owner, "fits": [record]})
        return history

    def _batch_two_does_not_fit(self, stage: str) -> str:
        """Why stepping at per-replica batch 2 could exhaust this machine's memory ('' when it
        fits): the plan's activations of one more example (times 1.5 for the allocator's and
        the kernels' scratch) against the memory available now."""
        owner = self._stage.name if self._stage else stage
        row = next((r for r in (self.plan or {}).get("stages", []) if r["stage"] == owner), {})
        more = 1.5 * float(row.get("activation_mb_per_example") or 0.0) * 2**20 * self.replicas
        available = staging.available_memory_bytes()
        if more <= available:
            return ""
        return (
            f"one more example needs about {more / staging.GB:.1f} GB (the plan's activations "
            f"x 1.5), {available / staging.GB:.1f} GB are available; {_FROM_PLAN}"
        )

    def _reset_meters(self) -> None:
        self._meter.reset()
        self._tensor_meter.reset()

    def _unique_stage(self, stage: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) or "stage"
        self._stages[safe] += 1
        count = self._stages[safe]
        return safe if count == 1 else f"{safe}_{count}"


class _StepTimer(tf.keras.callbacks.Callback):
    """Seconds of each train step (the first includes tracing the step); ``after_first`` is
    called once the first step has ended."""

    def __init__(self, after_first=None):
        super().__init__()
        self.seconds = []
        self._start = 0.0
        self._after_first = after_first

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        if len(self.seconds) == 1 and self._after_first is not None:
            self._after_first()


def _rebatch(data, global_batch: int):
    """The same examples at another global batch (a dry run's default), repeated."""
    if not isinstance(data, tf.data.Dataset):
        data = tf.data.Dataset.from_tensor_slices(tuple(data) if isinstance(data, list) else data)
        return data.repeat().batch(global_batch)
    return data.unbatch().repeat().batch(global_batch)


def _traced_findings(model, data) -> list:
    """Ops without a deterministic GPU kernel in the train step ``fit`` traced (traced again
    from ``data`` when Keras kept no graph, e.g. under ``run_eagerly``)."""
    function = getattr(model, "train_function", None)
    graphs = []
    if function is not None and hasattr(function, "_list_all_concrete_functions"):
        graphs = [c.graph for c in function._list_all_concrete_functions()]
    if not graphs:
        return determinism.find_nondeterministic_ops(model, data)
    names = [m.name for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]
    return [f for g in graphs for f in determinism.find_in_graph(g, names)]


def resolve_determinism(setting: str) -> bool:
    """Whether op determinism is turned on for ``train.deterministic=setting`` on this machine
    (``auto``: on without GPUs, off with one log line when a GPU is visible)."""
    if setting != "auto":
        return setting == "true"
    if not tf.config.list_physical_devices("GPU"):
        return True
    log.info(
        "train.deterministic=auto: TensorFlow op determinism is off on GPUs (TensorFlow 2.15 has "
        "no deterministic GPU kernel for some of the papers' ops, e.g. the gradient of "
        "UpSampling2D); --set train.deterministic=true turns it on and checks every stage first"
    )
    return False


def _op_determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on (set by ``seed_everything``)."""
    from tensorflow.python.framework import config as tf_config  # no public getter in TF 2.15

    return bool(tf_config.is_op_determinism_enabled())


def synthetic_records(dataset: str, root: pathlib.Path, data, seed: int) -> pathlib.Path:
    """``<root>/records/<dataset>``: the dataset's on-disk layout generated at ``data``'s
    synthetic size, scale and label noise from ``seed``, then converted (kept when it exists)."""
    import data_prep
    from drkeras.data import synthetic

    raw = root / "raw" / dataset
    out = root / "records" / dataset
    if (out / "manifest.json").is_file():
        return out
    synthetic.write_layout(
        raw,
        dataset,
        counts=synthetic.scaled_counts(dataset, data.synthetic_scale),
        size=data.synthetic_size,
        seed=seed,
        label_noise=data.synthetic_label_noise,
    )
    data_prep.convert(dataset, raw, out)
    return out


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python experiments/{experiment.name}.py",
        description=experiment.title or experiment.name,
    )
    parser.add_argument(
        "--data",
        default=SYNTHETIC,
        help="'synthetic' (default: generated fundus images) or a folder holding one converted "
        "dataset per sub-folder (ROOT/idrid, ROOT/ddr, ...)",
    )
    parser.add_argument("--preset", default="smoke", choices=sorted(experiment.presets))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument(
        "--strategy",
        choices=distribute.STRATEGIES,
        default=None,
        help="device strategy (default: the preset's, normally 'auto')",
    )
    parser.add_argument(
        "--out", default=None, help=f"run directory (default: runs/{experiment.name}_<preset>)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: preset's)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete the run directory's checkpoints and history and start over (without it, "
        "the same command resumes an interrupted run)",
    )
    parser.add_argument(
        "--dry-run",
        nargs="?",
        type=int,
        const=2,
        default=0,
        metavar="N",
        help="execute every stage of the preset for N steps (default 2) at per-replica batches 1 "
        "and 2, on small synthetic data at the preset's resolution (or --data), then its "
        "evaluation, tables and export; writes <out>/dry_run.json beside plan.json",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="replace every pretrained weight file by random initialisation (offline dry runs; "
        "the results then say nothing about the paper)",
    )
    drkeras.startup.add_verbose_flag(parser)
    return parser


def resolve_config(experiment: Experiment, args: argparse.Namespace) -> Config:
    """The run's config: preset, then ``--set`` overrides, then the dedicated flags."""
    config = resolve_preset(experiment.presets, args.preset, args.overrides)
    flags = [f"data.source={args.data}"]
    if getattr(args, "dry_run", 0):
        data = config.data
        flags += [
            f"data.synthetic_size={max(data.synthetic_size, data.image_size)}",
            "train.keep_checkpoints=none",
        ]
        if args.data != SYNTHETIC and not data.max_examples:
            flags.append(f"data.max_examples={DRY_RUN_REAL_EXAMPLES}")
    if args.strategy:
        flags.append(f"distribute.strategy={args.strategy}")
    if args.seed is not None:
        flags.append(f"seed={args.seed}")
    return apply_overrides(config, flags)


# A dry run on real records reads at most this many examples per split (unless set).
DRY_RUN_REAL_EXAMPLES = 32


def _machine(config: Config, replicas: int, dry_run: bool) -> staging.Machine:
    """What the plan is checked against: this machine's RAM, and the accelerator memory of
    ``train.accelerator_memory_gb``, of the detected GPU, or (dry runs on a machine without
    GPUs) of ``train.accelerator``, for ``train.accelerators`` devices."""
    train = config.train
    host = staging.machine_memory_bytes()
    accel_gb = train.accelerator_memory_gb or _detected_gpu_memory_gb()
    if not accel_gb and dry_run:
        accel_gb = staging.ACCELERATORS[train.accelerator]["memory_gb"]
    budget = (
        int(config.data.host_memory_gb * staging.GB)
        if config.data.host_memory_gb
        else staging.default_host_budget(host)
    )
    return staging.Machine(
        host_bytes=host,
        accelerator=train.accelerator,
        accelerator_bytes=int(accel_gb * staging.GB),
        replicas=train.accelerators or replicas,
        mixed_precision=train.mixed_precision,
        cache_budget_bytes=budget,
    )


def _detected_gpu_memory_gb() -> float:
    """Memory of the first visible GPU from ``nvidia-smi`` (0 without one)."""
    if not tf.config.list_physical_devices("GPU") or not shutil.which("nvidia-smi"):
        return 0.0
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return float(out[0]) / 1024 if out else 0.0
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0.0


def plan_stages(
    ctx: RunContext, declared: Sequence[Stage], machine: staging.Machine, *, networks: bool = True
) -> dict:
    """Plan ``declared`` (building each network once), choose the caches, write
    ``plan.json`` and log the plan table; returns the plan. ``networks=False`` plans the data
    side only (host RAM of caches and buffers; networks count zero)."""
    staging.check_stages(declared)
    ctx.cache = staging.cache_plan(
        declared, ctx.config.data.cache, machine.cache_budget_bytes, ctx.out_dir / "cache"
    )
    if networks:
        figures = staging.figures_of(declared)
    else:
        zero = staging.NetFigures(0, 0, 0, 0)
        figures = {net.name: zero for stage in declared for net in stage.nets}
    plan = staging.plan_run(declared, figures, ctx.cache, machine)
    checkpoint.write_json_atomic(ctx.out_dir / "plan.json", plan)
    log.info("resource plan (%s):\n%s", ctx.out_dir / "plan.json", staging.format_plan(plan))
    ctx.plan = plan
    return plan


def main(experiment: Experiment, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``experiment`` from the command line; returns the process exit code."""
    from drkeras import weights
    from drkeras.results import write_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser(experiment)
    args = parser.parse_args(argv)
    if args.dry_run:  # before the first TensorFlow op creates the CPU device and its pool
        cap, ours = staging.cap_cpu_pool()
        log.info(
            "dry run: TensorFlow's CPU memory pool is capped at %.1f GB (%s%s): a step too "
            "large for this machine raises an out-of-memory error instead of being killed",
            cap / staging.GB,
            staging.CPU_POOL_VARIABLE,
            ", set here" if ours else ", yours",
        )
    try:
        config = resolve_config(experiment, args)
        if args.random_weights:
            files = experiment.pretrained_weights(config)
            config = apply_overrides(config, weights.random_weight_overrides(experiment, config))
            if files:
                log.warning(weights.random_weights_warning(files))
    except ConfigError as err:
        parser.error(str(err))
    if config.data.source != SYNTHETIC and not pathlib.Path(config.data.source).is_dir():
        parser.error(f"--data {config.data.source}: no such folder (or use --data synthetic)")

    strategy = distribute.make_strategy(
        config.distribute.strategy, cpu_replicas=config.distribute.cpu_replicas
    )
    role = distribute.worker_role(strategy)
    out_dir = pathlib.Path(args.out or f"runs/{experiment.name}_{args.preset}")
    if not role.is_chief:
        # Workers checkpoint too (saving reads mirrored state collectively) but must not
        # overwrite the chief's files on a shared file system.
        out_dir = out_dir / "workers" / f"{role.task_type}_{role.task_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        _start_over(out_dir)
    else:
        problem = _resume_conflict(config, out_dir)
        if problem:
            parser.error(problem)
    save_config(config, out_dir / "config.json")
    if config.data.batch_size % strategy.num_replicas_in_sync:
        log.warning(
            "data.batch_size=%d is not a multiple of the %d replicas: replicas get unequal "
            "shares of each global batch",
            config.data.batch_size,
            strategy.num_replicas_in_sync,
        )

    previous_policy = tf.keras.mixed_precision.global_policy()
    previous_rng = tf.keras.backend.experimental.is_tf_random_generator_enabled()
    deterministic = resolve_determinism(config.train.deterministic)
    if deterministic and config.train.jit_compile:
        # XLA refuses max-pooling gradients (every VGG16 model) under op determinism.
        log.warning(
            "train.jit_compile: TensorFlow op determinism is left off (XLA has no deterministic "
            "max-pooling gradient); runs are reproducible only up to float rounding"
        )
        deterministic = False
    distribute.seed_everything(config.seed, deterministic=deterministic)
    # Random layers then keep their state in tf.random.Generator variables, which the stage
    # checkpoints save: a resumed run draws the same dropout masks as an uninterrupted one.
    tf.keras.backend.experimental.enable_tf_random_generator()
    policy = distribute.set_precision(config.train.mixed_precision)
    log.info(
        "%s: preset %s, %d replica(s) on %d worker(s), precision %s, run directory %s",
        experiment.name,
        args.preset,
        strategy.num_replicas_in_sync,
        role.num_workers,
        policy,
        out_dir,
    )
    ctx = RunContext(config, out_dir, strategy, role)
    ctx.dry_run = args.dry_run
    start = time.time()
    try:
        weights.ensure_available(
            experiment, config, preset=args.preset, overrides=args.overrides, log=log.info
        )
        staged = experiment.prepare(ctx)
        declared = list(staged.stages())
        machine = _machine(config, strategy.num_replicas_in_sync, bool(args.dry_run))
        plan_stages(ctx, declared, machine)
        if not args.dry_run:
            staging.check_plan(ctx.plan, machine)
        # Planning built every network once: start the stages from the run's seed again.
        distribute.seed_everything(config.seed, deterministic=deterministic)
        ctx.execute(declared)
        tables = staged.report()
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 3
    except (
        determinism.NondeterministicOps,
        staging.PlanExceeded,
        weights.MissingWeights,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        default = previous_policy.name == tf.keras.backend.floatx()
        tf.keras.mixed_precision.set_global_policy(None if default else previous_policy)
        if not previous_rng:
            tf.keras.backend.experimental.disable_tf_random_generator()
    # a dry run trains one stage per group: the cells of those that only built their data
    # read 'not run' (PLDMLT's DDR rows) instead of refusing the tables
    csv_path, md_path = write_results(tables, out_dir, allow_missing=bool(args.dry_run))
    if args.dry_run:
        _write_dry_run(ctx, experiment, args.preset, time.time() - start)
    if config.train.keep_checkpoints == "none":
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
        log.info(
            "run complete: its checkpoints were deleted (train.keep_checkpoints=none); running "
            "the same command again trains again"
        )
    print()
    print(md_path.read_text())
    print(
        f"{experiment.name}: finished in {time.time() - start:.0f} s; results in {csv_path} "
        f"and {md_path}"
    )
    return 0


# How a dry run fills in a batch it could not step (dry_run.json's "skipped" reasons).
_FROM_PLAN = "time and memory are extrapolated from batch 1 with the plan's figure per example"


def _activation_check(row: Mapping, measured_mb: Optional[float]) -> Dict[str, object]:
    """The plan's activation figure against the dry run's (the allocator's growth per example
    from batch 1 to 2): ``measured_over_planned_activations``, or ``activation_check`` saying
    why there is no ratio. Where one example's activations weigh less than the stage's weights,
    the step's peak is the optimizer update (weight-sized gradients and slot updates, after the
    activations are freed), which does not grow with the batch: the cooperative paper's FCN-8s
    (134 M parameters, 83 MB per example at 256 px) read 1.45 GB at batch 1 and 1.49 at 2."""
    planned = row.get("activation_mb_per_example")
    if not planned:
        return {"activation_check": "no planned activation figure"}
    if measured_mb is None:
        return {"activation_check": "batch 2 not stepped"}
    weights_mb = 4 * int(row.get("parameters") or 0) / 2**20
    if planned < weights_mb:
        return {
            "activation_check": f"not resolvable: one example's activations ({planned:.0f} MB "
            f"planned) weigh less than the weights ({weights_mb:.0f} MB), so the step's peak is "
            "the optimizer update, not the backward pass"
        }
    return {"measured_over_planned_activations": round(measured_mb / planned, 2)}


def _write_dry_run(ctx: RunContext, experiment: Experiment, preset: str, seconds: float) -> None:
    """``dry_run.json``: per stage what the dry run measured, beside the plan's figures, and
    time and peak memory extrapolated linearly from per-replica batches 1 and 2 to the
    preset's per-replica batch (on this machine)."""
    planned = {row["stage"]: row for row in (ctx.plan or {}).get("stages", [])}
    stages_out = []
    for entry in ctx.dry_stages:
        row = planned.get(entry["stage"], {})
        target = row.get("per_replica_batch", 1)
        out = dict(entry)
        out["planned"] = {
            k: row.get(k)
            for k in ("parameters", "flops_per_step", "per_replica_batch", "host_ram_gb",
                      "accelerator_gb_per_replica", "activation_mb_per_example")
        }  # fmt: skip
        for fit in entry.get("fits", []):
            b1, b2 = fit["batches"]["1"], fit["batches"]["2"]
            t1 = fit["seconds_per_step"]["1"]
            if "skipped" in b2:  # batch 2 would not fit here: batch 1 and the plan's figure
                per_example = rss_per_example = (row.get("activation_mb_per_example") or 0) / 1024
                t2 = 2 * t1
                fit["measured_mb_per_example"] = None
            else:
                # TensorFlow's allocator measures tensors alone; the resident size also holds
                # oneDNN's pool of earlier stages' freed memory (a high-water mark)
                per_example = b2["peak_tensor_gb"] - b1["peak_tensor_gb"]
                rss_per_example = b2["peak_rss_gb"] - b1["peak_rss_gb"]
                t2 = fit["seconds_per_step"]["2"]
                fit["measured_mb_per_example"] = round(per_example * 1024, 1)
            fit["extrapolated_to_batch"] = {
                "from": "batch 1 and the plan" if "skipped" in b2 else "batches 1 and 2",
                "per_replica_batch": target,
                "peak_tensor_gb": round(b1["peak_tensor_gb"] + (target - 1) * per_example, 2),
                "peak_rss_gb": round(b1["peak_rss_gb"] + (target - 1) * rss_per_example, 2),
                "seconds_per_step": round(t1 + (target - 1) * (t2 - t1), 3),
            }
            fit.update(_activation_check(row, fit["measured_mb_per_example"]))
        stages_out.append(out)
    missing = [name for name in planned if name not in {s["stage"] for s in stages_out}]
    payload = {
        "experiment": experiment.name,
        "preset": preset,
        "steps_per_batch_size": ctx.dry_run,
        "seconds": round(seconds, 1),
        "replicas": ctx.replicas,
        "stages": stages_out,
        "declared_stages_not_reached": missing,
    }
    path = checkpoint.write_json_atomic(ctx.out_dir / "dry_run.json", payload)
    log.info("dry run: %d stages in %.0f s; %s", len(stages_out), seconds, path)


# Settings that may change between a run and its resumption.
RESUME_FREE_KEYS = ("train.verbose", "train.keep_checkpoints")


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _resume_conflict(config: Config, out_dir: pathlib.Path) -> Optional[str]:
    """Why ``out_dir`` cannot be resumed with ``config`` (``None`` when it can)."""
    saved_path = out_dir / "config.json"
    checkpoints = out_dir / "checkpoints"
    if not saved_path.is_file() or not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        return None
    try:
        saved = _flatten(json.loads(saved_path.read_text()))
    except json.JSONDecodeError:
        return f"{saved_path} is not valid JSON; run with --fresh to start over"
    current = _flatten(json.loads(json.dumps(config_to_dict(config))))
    changed = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUME_FREE_KEYS
        and saved.get(key, "<absent>") != current.get(key, "<absent>")
    )
    if not changed:
        return None
    details = ", ".join(
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}" for k in changed
    )
    return (
        f"{out_dir} holds checkpoints of a run with a different config ({details}); rerun the "
        "original command to resume it, choose another --out, or add --fresh to start over"
    )


def _start_over(out_dir: pathlib.Path) -> None:
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    (out_dir / "history.csv").unlink(missing_ok=True)


def run_config_summary(config: Config) -> str:
    """One line naming the settings a reader of a results table needs (for table titles)."""
    d = config.data
    return (
        f"data={d.source}, {d.image_size}px, batch {d.batch_size}, epochs {config.train.epochs}, "
        f"runs {config.train.runs}"
    )


__all__ = [
    "Experiment",
    "RunContext",
    "build_parser",
    "main",
    "resolve_config",
    "run_config_summary",
]
