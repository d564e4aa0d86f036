"""The shared runner: CLI flags, run directory outputs, history, results tables, NaN handling."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from drkeras.config import Config, OptimizerConfig
from drkeras.experiment import Experiment, main
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.optim import build_optimizer


@dataclasses.dataclass(frozen=True)
class Method:
    noise: float = 0.0


class LinearProbe(Experiment):
    """Logistic regression on a linearly separable 2-D problem: fast, and its result is known."""

    name = "probe"
    title = "Linear probe"
    presets = {
        "smoke": Config(
            method=Method(),
            optimizers={"model": OptimizerConfig(name="sgd", learning_rate=0.5)},
        )
    }

    def prepare(self, ctx):
        return _ProbeRun(ctx)


class _ProbeRun:
    def __init__(self, ctx):
        self.ctx = ctx
        rng = np.random.default_rng(ctx.config.seed)
        self.x = rng.normal(size=(256, 2)).astype("float32") + ctx.config.method.noise
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).astype("float32")
        self.table = ResultsTable(
            "table1", "Table 1", ["Accuracy"], paper={"Probe": {"Accuracy": 1.0}}
        )

    def _model(self):
        return tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1, "sigmoid")])

    def stages(self):
        data = Data(
            "probe",
            lambda cache: tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(32),
            examples=256,
            size=1,
            batch=32,
            cached=False,
            train=True,
        )
        return [Stage("probe", self.train, nets=[Net("probe", self._model, optimizer="sgd")],
                      data=[data], steps=8, batch=32)]  # fmt: skip

    def train(self, inputs):
        ctx = self.ctx
        with ctx.strategy.scope():
            model = self._model()
            model.compile(
                optimizer=build_optimizer(ctx.config.optimizers["model"]),
                loss="binary_crossentropy",
                metrics=["accuracy"],
            )
        data = ctx.data("probe")
        ctx.fit(model, data)
        self.table.add("Probe", "Accuracy", float(model.evaluate(data, verbose=0)[1]))

    def report(self):
        return [self.table]


def test_run_writes_config_history_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(LinearProbe(), ["--out", str(out), "--set", "train.epochs=3", "--seed", "4"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 3
    assert config["seed"] == 4
    assert config["data"]["source"] == "synthetic"
    assert config["optimizers"]["model"] == {**config["optimizers"]["model"], "name": "sgd"}

    with (out / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {r["stage"] for r in rows} == {"probe"}
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0]

    with (out / "results.csv").open() as handle:
        results = list(csv.DictReader(handle))
    assert len(results) == 1
    assert results[0]["row"] == "Probe" and results[0]["column"] == "Accuracy"
    assert float(results[0]["ours_mean"]) > 0.9
    assert float(results[0]["paper"]) == 1.0
    assert (out / "results.md").read_text() in capsys.readouterr().out
    assert any((out / "tensorboard" / "probe").iterdir())


def test_history_keeps_stages_in_one_file(tmp_path):
    from drkeras.training.callbacks import HistoryCSV

    path = tmp_path / "history.csv"
    first, second = HistoryCSV(path, "pretrain"), HistoryCSV(path, "joint")
    first.on_epoch_end(0, {"loss": 1.0})
    second.on_epoch_end(0, {"loss": 0.5, "seg_loss": 0.25})
    assert path.read_text().splitlines() == [
        "stage,epoch,loss,seg_loss",
        "pretrain,1,1.0,",
        "joint,1,0.5,0.25",
    ]


def test_nan_loss_stops_with_a_message_naming_the_stage(tmp_path, capsys):
    code = main(
        LinearProbe(),
        ["--out", str(tmp_path / "nan"), "--set", "method.noise=inf", "--set", "train.verbose=0"],
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "training diverged: stage 'probe': loss became nan at epoch 1, batch 1" in err
    assert not (tmp_path / "nan" / "results.csv").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "train.epoch=2"], "unknown config key 'train.epoch'"),
        (["--preset", "paper"], "invalid choice: 'paper'"),
        (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(LinearProbe(), argv + ["--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
