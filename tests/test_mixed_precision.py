"""Mixed precision and XLA on CPU: the bilevel trainer's loss scaling under ``mixed_float16``
(finite, close to float32, overflowing steps skipped), its XLA-compiled step, and the runner's
``train.mixed_precision`` / ``train.jit_compile`` settings."""

import csv
import logging

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras
from tiny_experiment import (
    Tiny,
    TwoOptimizerTrainer,
    bilevel_data,
    build_mlp,
    build_tiny_multitask,
    make_data,
)

from drkeras.config import Config, TrainConfig
from drkeras.experiment import RunContext, main
from drkeras.models.pldmlt import build_label_update_net
from drkeras.training.bilevel import BilevelMultiTaskTrainer

LSO = keras.mixed_precision.LossScaleOptimizer


def _trainer(policy=None, model_optimizer=None, label_optimizer=None, weights=None):
    keras.mixed_precision.set_global_policy(policy)
    try:
        trainer = BilevelMultiTaskTrainer(
            build_tiny_multitask(),
            build_label_update_net(input_shape=(16, 16, 3), widths=(4,), hidden=6),
        )
    finally:
        keras.mixed_precision.set_global_policy(None)
    # The label network's last layer starts at zero (only it would move in one step): random
    # values give every variable a gradient to compare.
    rng = np.random.default_rng(0)
    for var in trainer.label_network.get_layer("label_correction").trainable_variables:
        var.assign(rng.normal(0.0, 0.5, var.shape).astype(np.float32))
    trainer.compile(
        model_optimizer=model_optimizer or keras.optimizers.SGD(0.1),
        label_optimizer=label_optimizer or keras.optimizers.SGD(20.0),
        virtual_lr=0.5,
    )
    if weights is not None:
        trainer.set_weights(weights)
    return trainer


def _deltas(trainer, data):
    before = [w.numpy() for w in trainer.trainable_variables]
    logs = trainer.train_on_batch(*data, return_dict=True)
    return [w.numpy() - b for w, b in zip(trainer.trainable_variables, before)], logs


def test_bilevel_trainer_scales_losses_under_mixed_float16():
    data = bilevel_data(np.random.default_rng(0))
    reference = _trainer()
    start = reference.get_weights()
    expected, expected_logs = _deltas(reference, data)

    mixed = _trainer("mixed_float16", weights=start)
    assert mixed.multitask.get_layer("enc").compute_dtype == "float16"
    assert isinstance(mixed.model_optimizer, LSO) and isinstance(mixed.label_optimizer, LSO)
    assert mixed.optimizer is mixed.model_optimizer
    deltas, logs = _deltas(mixed, data)
    assert set(logs) == {"loss", "seg_loss", "grade_loss", "meta_loss"}
    for key, value in logs.items():
        assert np.isfinite(value)
        np.testing.assert_allclose(value, expected_logs[key], rtol=1e-2)  # unscaled
    for got, want in zip(deltas, expected):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, atol=3e-2 * np.abs(want).max())

    # A loss scale of 2**40 overflows float16 gradients: both steps are skipped, both scales
    # halve, and the logged losses stay the unscaled, finite values.
    overflow = _trainer(
        "mixed_float16",
        LSO(keras.optimizers.SGD(0.1), initial_scale=2.0**40),
        LSO(keras.optimizers.SGD(20.0), initial_scale=2.0**40),
        weights=start,
    )
    deltas, logs = _deltas(overflow, data)
    assert all(np.array_equal(d, np.zeros_like(d)) for d in deltas)
    assert float(overflow.model_optimizer.loss_scale) == 2.0**39
    assert float(overflow.label_optimizer.loss_scale) == 2.0**39
    np.testing.assert_allclose(logs["loss"], expected_logs["loss"], rtol=1e-2)


def _two_optimizer(weights=None):
    trainer = TwoOptimizerTrainer(build_mlp(0.0, "classifier"), build_mlp(0.0, "regressor"))
    trainer.compile(
        c_optimizer=keras.optimizers.Adam(0.05), r_optimizer=keras.optimizers.SGD(0.05, 0.9)
    )
    if weights is not None:
        trainer.set_weights(weights)
    return trainer


def test_custom_step_compiled_with_xla_through_the_runner(tmp_path):
    # (Not the bilevel trainer: XLA has no deterministic max-pooling gradient, and the test
    # session runs with TF_DETERMINISTIC_OPS.)
    x, y = make_data(0, 16)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    reference = _two_optimizer()
    start = reference.get_weights()
    reference.fit(data, epochs=1, verbose=0)

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    config = Config(method=None, train=TrainConfig(epochs=1, jit_compile=True, verbose=0))
    with strategy.scope():
        compiled = _two_optimizer(start)
    assert not compiled.jit_compile
    history = RunContext(config, tmp_path, strategy).fit(
        compiled, data, stage="xla", checkpoint_steps=0
    )
    assert compiled.jit_compile
    assert all(np.isfinite(v[0]) for v in history.history.values())
    for w0, w, want in zip(start, compiled.get_weights(), reference.get_weights()):
        scale = np.abs(want - w0).max()
        assert scale > 0
        np.testing.assert_allclose(w - w0, want - w0, atol=1e-4 * scale)


def test_runner_mixed_precision_and_jit_settings_on_cpu(tmp_path, caplog):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--set", "train.mixed_precision=true"]
    argv += ["--set", "train.jit_compile=true", "--set", "method.checkpoint_steps=0"]
    argv += ["--set", "method.samples=32", "--set", "train.epochs=2"]
    with caplog.at_level(logging.INFO, logger="drkeras"):
        assert main(Tiny(), argv) == 0
    assert "precision mixed_bfloat16" in caplog.text
    # The runner leaves the process as it found it.
    assert keras.mixed_precision.global_policy().name == "float32"
    assert not keras.backend.experimental.is_tf_random_generator_enabled()
    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("pretrain", "1"),
        ("pretrain", "2"),
        ("joint", "1"),
        ("joint", "2"),
    ]
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses))
    assert losses[1] < losses[0] and losses[3] < losses[2]


@pytest.fixture(autouse=True)
def _default_policy():
    yield
    keras.mixed_precision.set_global_policy(None)
