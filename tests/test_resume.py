"""Fault tolerance of the runner: SIGKILL mid-epoch then the same command gives the same
weights; an interrupted Keras ``fit`` resumes its weights and epoch logs; a NaN keeps the last
good checkpoint; a changed config is refused; ``--fresh`` starts over."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from tiny_experiment import Tiny

from drkeras.config import Config, TrainConfig
from drkeras.experiment import RunContext, main
from drkeras.training.checkpoint import StageCheckpointer

SCRIPT = os.path.join(os.path.dirname(__file__), "tiny_experiment.py")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")


def _state(out, stage):
    path = out / "checkpoints" / stage / "state.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_weights(expected_npz, actual_npz):
    expected, actual = np.load(expected_npz), np.load(actual_npz)
    assert sorted(expected) == sorted(actual)
    assert len(expected) > 20  # weights of both stages and the three optimizers' variables
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_sigkill_mid_epoch_then_same_command_ends_with_the_same_weights(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    # The joint stage (8 steps per epoch, a checkpoint every 2 steps) hangs before its global
    # batch 10, i.e. in epoch 2 after its checkpoint of step 2; it is killed there.
    command = [sys.executable, SCRIPT, "--out", str(out), "--set", "method.hang_at_step=10"]
    with open(tmp_path / "killed.log", "w") as log_file:
        process = subprocess.Popen(command, env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            # The uninterrupted run, meanwhile.
            assert main(Tiny(), ["--out", str(reference)]) == 0
            deadline = time.time() + 180
            while time.time() < deadline and process.poll() is None:
                state = _state(out, "joint")
                if state and state["global_step"] == 10 and (out / "hung_once").exists():
                    break
                time.sleep(0.05)
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
    state = _state(out, "joint")
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 10)
    assert not (out / "checkpoints" / "joint" / "done.json").exists()
    assert (out / "checkpoints" / "pretrain" / "done.json").exists()
    assert not (out / "weights.npz").exists() and not (out / "results.csv").exists()

    # The same command again.
    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage pretrain: finished in an earlier run" in rerun.stderr
    assert "stage joint: resuming from" in rerun.stderr and "(epoch 2, step 2)" in rerun.stderr
    _assert_same_weights(reference / "weights.npz", out / "weights.npz")
    # Every epoch logged once, with the values of the uninterrupted run (restored metrics).
    assert _rows(out / "history.csv") == _rows(reference / "history.csv")
    assert len(_rows(out / "history.csv")) == 5


class _Crash(tf.keras.callbacks.Callback):
    """Raise at the end of the ``at_step``-th step (before the checkpointer sees it)."""

    def __init__(self, at_step):
        super().__init__()
        self.at_step, self.steps = at_step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at_step:
            raise RuntimeError("simulated crash")


def _keras_stage(out, callbacks=()):
    """A compiled Keras model with dropout and a metric, trained 2 epochs of 6 steps by ctx.fit."""
    tf.keras.utils.set_random_seed(1)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    ctx = RunContext(Config(method=None, train=TrainConfig(epochs=2, verbose=0)), out, strategy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = (x[:, 0] > x[:, 1]).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48, seed=3).batch(8)
    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.layers.Dense(8, activation="relu", name="hidden"),
                tf.keras.layers.Dropout(0.3, name="dropout"),
                tf.keras.layers.Dense(1, activation="sigmoid", name="out"),
            ]
        )
        model.compile(tf.keras.optimizers.Adam(0.05), "binary_crossentropy", ["accuracy"])
    history = ctx.fit(model, data, stage="fit", callbacks=list(callbacks), checkpoint_steps=2)
    return model, history


@pytest.mark.parametrize(
    "crash_at, resume_at",
    # Step 11 = epoch 2, step 5 of 6: the last checkpoint (every 2 steps) is step 10.
    # Step 7 = epoch 2, step 1: the last checkpoint is the end of epoch 1.
    [(11, (1, 4, 10)), (7, (1, 0, 6))],
)
def test_interrupted_keras_fit_resumes_weights_optimizer_and_epoch_logs(
    tmp_path, crash_at, resume_at
):
    tf.keras.backend.experimental.enable_tf_random_generator()
    try:
        expected, expected_history = _keras_stage(tmp_path / "a")
        with pytest.raises(RuntimeError, match="simulated crash"):
            _keras_stage(tmp_path / "b", [_Crash(at_step=crash_at)])
        saver = StageCheckpointer(tmp_path / "b" / "checkpoints" / "fit", steps_per_epoch=6)
        assert (saver.epoch, saver.step, saver.global_step) == resume_at
        assert saver.resuming and not saver.finished
        resumed, history = _keras_stage(tmp_path / "b")
    finally:
        tf.keras.backend.experimental.disable_tf_random_generator()
    for a, b in zip(expected.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(b, a)
    for a, b in zip(expected.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert int(resumed.optimizer.iterations) == 12
    assert history.history == expected_history.history
    assert set(history.history) == {"loss", "accuracy"} and len(history.epoch) == 2
    assert _rows(tmp_path / "b" / "history.csv") == _rows(tmp_path / "a" / "history.csv")


def _finite_checkpoint(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    names = [
        name
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if dtype.is_floating and "OBJECT_GRAPH" not in name
    ]
    assert len(names) > 20
    return all(np.all(np.isfinite(reader.get_tensor(name))) for name in names)


def test_nan_keeps_the_last_good_checkpoint_then_config_change_refused_then_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--set", "method.nan_at_step=12"]
    assert main(Tiny(), argv) == 3
    err = capsys.readouterr().err
    # Batch 12 of the joint stage is the 5th step of epoch 2; the checkpoint before it is kept.
    assert "training diverged: stage 'joint': loss became nan at epoch 2, batch 5" in err
    assert f"the last good checkpoint is kept: {out}/checkpoints/joint/ckpt-12 (epoch 2" in err
    state = _state(out, "joint")
    assert (state["checkpoint"], state["global_step"]) == ("ckpt-12", 12)
    assert _finite_checkpoint(out / "checkpoints" / "joint" / "ckpt-12")
    assert not (out / "checkpoints" / "joint" / "done.json").exists()
    assert not (out / "results.csv").exists()

    with pytest.raises(SystemExit) as exit_info:
        main(Tiny(), argv + ["--set", "train.epochs=4"])
    assert exit_info.value.code == 2
    assert "holds checkpoints of a run with a different config (train.epochs: 3 -> 4)" in (
        capsys.readouterr().err
    )

    smaller = ["--set", "method.samples=32", "--set", "train.epochs=2"]
    assert main(Tiny(), ["--out", str(out), "--fresh"] + smaller) == 0
    rows = _rows(out / "history.csv")
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("pretrain", "1"),
        ("pretrain", "2"),
        ("joint", "1"),
        ("joint", "2"),
    ]
    assert all(np.isfinite(float(r["loss"])) for r in rows)


def test_a_stage_name_used_twice_gets_its_own_checkpoints_and_history_rows(tmp_path):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    ctx = RunContext(Config(method=None, train=TrainConfig(verbose=0)), tmp_path, strategy)
    data = tf.data.Dataset.from_tensor_slices((np.ones((4, 2)), np.zeros((4, 1)))).batch(2)
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.layers.Dense(1, name="dense")])
        model.compile("sgd", "mse")
    for _ in range(2):
        history = ctx.fit(model, data, stage="run/a", checkpoint_steps=0)
        assert len(history.history["loss"]) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["run_a", "run_a_2"]
    assert [r["stage"] for r in _rows(tmp_path / "history.csv")] == ["run_a", "run_a_2"]


def _checkpoint_files(stage_dir):
    return sorted(p.name for p in stage_dir.iterdir() if p.name not in ("state.json", "done.json"))


def test_a_finished_stage_keeps_its_final_weights_only_and_a_rerun_restores_them(tmp_path, capsys):
    out = tmp_path / "lean"
    assert main(Tiny(), ["--out", str(out)]) == 0
    first = dict(np.load(out / "weights.npz"))
    for stage, steps in (("pretrain", 16), ("joint", 24)):
        stage_dir = out / "checkpoints" / stage
        # The resumable checkpoints (every 2 steps, the last two kept) are gone.
        assert _checkpoint_files(stage_dir) == [
            f"final-{steps}.data-00000-of-00001",
            f"final-{steps}.index",
        ]
        assert _state(out, stage)["weights_only"] is True
        names = [name for name, _ in tf.train.list_variables(str(stage_dir / f"final-{steps}"))]
        weights = [n for n in names if n.startswith("weights/")]
        assert weights and all(n.startswith("weights/") or "CHECKPOINTABLE" in n for n in names)
        assert not any("optimizer" in n.lower() or "iter" in n for n in names)
    # weights.npz holds the pretrained MLP's weights (m0) but no optimizer of it: the run does
    # not need it after its stage, so neither the first run nor a rerun has it.
    assert sum(k.startswith("m0_w") for k in first) == 4
    assert not any(k.startswith("m0_") and "optimizer" in k for k in first)
    assert sum(k.startswith("m1_r_optimizer_v") for k in first) == 5  # SGD: iterations + momenta

    # The same command again trains nothing and ends with the same weights (the optimizer
    # state of the last stage is not restored, so only weights are compared).
    capsys.readouterr()
    assert main(Tiny(), ["--out", str(out)]) == 0
    again = np.load(out / "weights.npz")
    for key in (k for k in first if "_w" in k and "optimizer" not in k):
        np.testing.assert_array_equal(again[key], first[key], err_msg=key)


def test_keep_checkpoints_all_keeps_every_checkpoint_with_its_optimizer_state(tmp_path):
    out = tmp_path / "all"
    assert main(Tiny(), ["--out", str(out), "--set", "train.keep_checkpoints=all"]) == 0
    files = _checkpoint_files(out / "checkpoints" / "pretrain")
    # pretrain: 2 epochs of 8 steps, a checkpoint every 2 steps and at each epoch end.
    assert [f for f in files if f.endswith(".index")] == [
        f"ckpt-{step}.index" for step in sorted((2, 4, 6, 8, 10, 12, 14, 16), key=str)
    ]
    names = [n for n, _ in tf.train.list_variables(str(out / "checkpoints" / "pretrain/ckpt-16"))]
    assert any("optimizer/_variables/" in n for n in names)  # Adam slots, through the model
    assert _state(out, "pretrain").get("weights_only", False) is False
    with pytest.raises(SystemExit):
        main(Tiny(), ["--out", str(tmp_path / "bad"), "--set", "train.keep_checkpoints=some"])


def test_keep_checkpoints_none_deletes_them_when_the_run_completes_not_before(tmp_path):
    out = tmp_path / "none"
    keep_none = ["--set", "train.keep_checkpoints=none"]
    # A run that stops early (a NaN) keeps what resuming needs.
    assert main(Tiny(), ["--out", str(out), "--set", "method.nan_at_step=12"] + keep_none) == 3
    assert _state(out, "joint")["checkpoint"] == "ckpt-12"
    assert (out / "checkpoints" / "pretrain" / "done.json").is_file()
    # A completed run keeps its results and history, not its checkpoints.
    assert main(Tiny(), ["--out", str(out), "--fresh"] + keep_none) == 0
    assert not (out / "checkpoints").exists()
    assert (out / "results.csv").is_file() and len(_rows(out / "history.csv")) == 5
