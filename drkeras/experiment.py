"""The shared experiment runner behind every ``experiments/<paper>.py`` (docs/design.md section 3).

An experiment file declares an :class:`Experiment`: its name, the paper it reproduces, its
presets (:class:`drkeras.config.Config` values named ``smoke`` and ``paper``) and a ``run``
method that trains and evaluates through a :class:`RunContext` and returns the paper's tables as
:class:`drkeras.results.ResultsTable` objects. :func:`main` does the rest for every paper:

1. parse ``--data --preset --set --strategy --out --seed --fresh``;
2. resolve the config, pick the device strategy, seed everything, set the precision policy;
3. create the run directory (a worker of a multi-worker run other than the chief uses
   ``<out>/workers/<type>_<index>``) and save ``config.json``;
4. call ``experiment.run(ctx)``; ``ctx.fit`` gives every training stage a Keras progress bar, a
   shared ``history.csv``, TensorBoard logs, a NaN guard and checkpoints to resume from;
5. write ``results.csv`` / ``results.md`` (our numbers beside the paper's) and print the tables.

Resuming: run the SAME command again after a crash (or a kill) and the run continues where it
stopped. Each ``ctx.fit`` stage checkpoints its model, every optimizer, its metrics and its data
position in ``<out>/checkpoints/<stage>`` (:mod:`drkeras.training.checkpoint`); a finished stage
keeps only its final weights (``train.keep_checkpoints=all`` keeps every checkpoint; ``none``
deletes them all once the run has completed) and is not trained again (its final weights are
restored), an unfinished one
continues from its latest checkpoint, mid-epoch, with the batches an uninterrupted run would
have seen; on CPU with ``train.deterministic`` it ends with the same weights. A run directory
with checkpoints only resumes the config it was started with (``train.verbose`` may differ);
``--fresh`` deletes the checkpoints and history and starts over.

Example (an experiment file)::

    class MyPaper(Experiment):
        name = "mypaper"
        title = "My paper (2020)"
        presets = {"smoke": Config(method=Method()), "paper": Config(method=Method(), ...)}

        def run(self, ctx):
            table = ResultsTable("table1", "Table 1", ["Dice"], paper={"ours": {"Dice": 0.8}})
            ...
            return [table]

    if __name__ == "__main__":
        raise SystemExit(main(MyPaper()))
"""

from __future__ import annotations

import abc
import argparse
import collections
import json
import logging
import pathlib
import re
import shutil
import sys
import time
import zlib
from typing import Mapping, Optional, Sequence

import drkeras.startup

import tensorflow as tf

from drkeras.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_to_dict,
    resolve_preset,
    save_config,
)
from drkeras.training import checkpoint, determinism, distribute
from drkeras.training.callbacks import HistoryCSV, NaNGuard, TrainingDiverged

log = logging.getLogger("drkeras")

SYNTHETIC = "synthetic"


class Experiment(abc.ABC):
    """Base class of the papers' experiments; subclasses set the attributes and ``run``."""

    name: str = ""
    title: str = ""
    presets: Mapping[str, Config] = {}

    @abc.abstractmethod
    def run(self, ctx: RunContext) -> Sequence:
        """Train, evaluate and return the paper's tables (``ResultsTable`` objects)."""


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
            path = _synthetic_records(dataset, self.out_dir / "data", data, self.config.seed)
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
        stage: str,
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
            stage: the stage's name: its rows in ``history.csv``, its TensorBoard folder and
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
        stage = self._unique_stage(stage)
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

    def _unique_stage(self, stage: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) or "stage"
        self._stages[safe] += 1
        count = self._stages[safe]
        return safe if count == 1 else f"{safe}_{count}"


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


def _synthetic_records(dataset: str, root: pathlib.Path, data, seed: int) -> pathlib.Path:
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
    drkeras.startup.add_verbose_flag(parser)
    return parser


def resolve_config(experiment: Experiment, args: argparse.Namespace) -> Config:
    """The run's config: preset, then ``--set`` overrides, then the dedicated flags."""
    config = resolve_preset(experiment.presets, args.preset, args.overrides)
    flags = [f"data.source={args.data}"]
    if args.strategy:
        flags.append(f"distribute.strategy={args.strategy}")
    if args.seed is not None:
        flags.append(f"seed={args.seed}")
    return apply_overrides(config, flags)


def main(experiment: Experiment, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``experiment`` from the command line; returns the process exit code."""
    from drkeras.results import write_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser(experiment)
    args = parser.parse_args(argv)
    try:
        config = resolve_config(experiment, args)
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
    start = time.time()
    try:
        tables = experiment.run(ctx)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 3
    except determinism.NondeterministicOps as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        default = previous_policy.name == tf.keras.backend.floatx()
        tf.keras.mixed_precision.set_global_policy(None if default else previous_policy)
        if not previous_rng:
            tf.keras.backend.experimental.disable_tf_random_generator()
    csv_path, md_path = write_results(tables, out_dir)
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
