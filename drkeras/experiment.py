"""The shared experiment runner behind every ``experiments/<paper>.py`` (DESIGN.md section 3).

An experiment file declares an :class:`Experiment`: its name, the paper it reproduces, its
presets (:class:`drkeras.config.Config` values named ``smoke`` and ``paper``) and a ``run``
method that trains and evaluates through a :class:`RunContext` and returns the paper's tables as
:class:`drkeras.results.ResultsTable` objects. :func:`main` does the rest for every paper:

1. parse ``--data --preset --set --strategy --out --seed``;
2. resolve the config, seed everything, pick the device strategy, set the precision policy;
3. create the run directory and save ``config.json``;
4. call ``experiment.run(ctx)``; ``ctx.fit`` gives every training stage a Keras progress bar, a
   shared ``history.csv``, TensorBoard logs and a NaN guard;
5. write ``results.csv`` / ``results.md`` (our numbers beside the paper's) and print the tables.

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
import logging
import pathlib
import sys
import time
from typing import Mapping, Optional, Sequence

import tensorflow as tf

from drkeras.config import Config, ConfigError, apply_overrides, resolve_preset, save_config
from drkeras.training import distribute
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
        out_dir: the run directory (``config.json``, ``history.csv``, results, plots, ``export/``).
        strategy: the ``tf.distribute`` strategy; build models/optimizers/metrics in its scope.
    """

    def __init__(self, config: Config, out_dir: pathlib.Path, strategy: tf.distribute.Strategy):
        self.config = config
        self.out_dir = pathlib.Path(out_dir)
        self.strategy = strategy
        self.history_path = self.out_dir / "history.csv"
        self._records = {}

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
        **kwargs,
    ):
        """``model.fit`` with the run's callbacks; raises :class:`TrainingDiverged` on NaN.

        ``epochs`` and ``steps_per_epoch`` default to ``train.epochs`` and
        ``train.steps_per_epoch`` (0 = one pass over ``data``).
        """
        train = self.config.train
        steps = steps_per_epoch if steps_per_epoch is not None else train.steps_per_epoch
        cbs = self.callbacks(stage) + list(callbacks)
        log.info("stage %s: training", stage)
        history = model.fit(
            data,
            epochs=epochs if epochs is not None else train.epochs,
            steps_per_epoch=steps or None,
            callbacks=cbs,
            verbose=train.verbose,
            **kwargs,
        )
        guard = next(cb for cb in cbs if isinstance(cb, NaNGuard))
        if guard.failure:
            raise TrainingDiverged(guard.failure)
        return history


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

    out_dir = pathlib.Path(args.out or f"runs/{experiment.name}_{args.preset}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "config.json")

    strategy = distribute.make_strategy(
        config.distribute.strategy, cpu_replicas=config.distribute.cpu_replicas
    )
    distribute.seed_everything(config.seed, deterministic=config.train.deterministic)
    policy = distribute.set_precision(config.train.mixed_precision)
    log.info(
        "%s: preset %s, %d replica(s), precision %s, run directory %s",
        experiment.name,
        args.preset,
        strategy.num_replicas_in_sync,
        policy,
        out_dir,
    )
    ctx = RunContext(config, out_dir, strategy)
    start = time.time()
    try:
        tables = experiment.run(ctx)
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 3
    csv_path, md_path = write_results(tables, out_dir)
    print()
    print(md_path.read_text())
    print(
        f"{experiment.name}: finished in {time.time() - start:.0f} s; results in {csv_path} "
        f"and {md_path}"
    )
    return 0


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
