"""drkeras.training.determinism: the ops of a traced train step that TensorFlow 2.15 cannot run
deterministically on a GPU are found (with their layer) before training, on any device."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras.config import Config, TrainConfig
from drkeras.experiment import RunContext
from drkeras.training import determinism


def _data(size=8, channels=3, batch=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, size, size, channels)).astype("float32")
    y = rng.normal(size=(4, size, size, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _model(middle, *, run_eagerly=False):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down")(inputs)
    x = middle(x)
    outputs = keras.layers.Conv2D(1, 3, padding="same", name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse", run_eagerly=run_eagerly)
    return model


def test_upsampling2d_nearest_is_flagged_with_its_layer():
    model = _model(keras.layers.UpSampling2D(2, name="decoder_up"))
    findings = determinism.find_nondeterministic_ops(model, _data())
    assert [(f.op, f.layer) for f in findings] == [("ResizeNearestNeighborGrad", "decoder_up")]
    assert "ResizeNearestNeighborGrad" in findings[0].describe()
    assert "'decoder_up'" in findings[0].describe()


@pytest.mark.parametrize(
    "middle",
    [
        lambda: keras.layers.UpSampling2D(2, interpolation="bilinear", name="up"),
        lambda: keras.layers.Conv2DTranspose(4, 2, strides=2, name="up"),
    ],
)
def test_deterministic_upsampling_passes(middle):
    assert determinism.find_nondeterministic_ops(_model(middle()), _data()) == []


def test_frozen_batch_norm_gradient_is_flagged_and_a_training_one_is_not():
    def block(trainable):
        def apply(x):
            norm = keras.layers.BatchNormalization(name="norm")
            norm.trainable = trainable
            return keras.layers.UpSampling2D(2, interpolation="bilinear", name="up")(norm(x))

        return apply

    frozen = determinism.find_nondeterministic_ops(_model(block(False)), _data())
    assert [(f.op, f.layer) for f in frozen] == [("FusedBatchNormGradV3", "norm")]
    assert determinism.find_nondeterministic_ops(_model(block(True)), _data()) == []


def test_an_eager_model_is_traced_for_the_check_and_left_eager():
    model = _model(keras.layers.UpSampling2D(2, name="up"), run_eagerly=True)
    findings = determinism.find_nondeterministic_ops(model, _data())
    assert [f.op for f in findings] == ["ResizeNearestNeighborGrad"]
    assert model.run_eagerly
    history = model.fit(_data(), epochs=1, verbose=0)  # still trains (eagerly, on the CPU)
    assert np.isfinite(history.history["loss"][0])


def test_segment_reductions_are_flagged_for_floats_only():
    @tf.function
    def step(values, ids):
        return tf.math.unsorted_segment_sum(values, ids, 3)

    floats = step.get_concrete_function(
        tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.int32)
    ).graph
    ints = step.get_concrete_function(
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)
    ).graph
    assert [f.op for f in determinism.find_in_graph(floats)] == ["UnsortedSegmentSum"]
    assert determinism.find_in_graph(ints) == []


def test_the_runner_stops_before_training_on_a_gpu_with_determinism(tmp_path, monkeypatch):
    from tensorflow.python.framework import config as tf_config

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    ctx = RunContext(Config(method=None, train=TrainConfig(verbose=0)), tmp_path, strategy)
    with strategy.scope():
        model = _model(keras.layers.UpSampling2D(2, name="decoder_up"))
    before = [w.copy() for w in model.get_weights()]
    real = tf.config.list_logical_devices
    monkeypatch.setattr(
        tf.config,
        "list_logical_devices",
        lambda kind=None: ["/gpu:0"] if kind == "GPU" else real(kind),
    )
    was_on = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        with pytest.raises(determinism.NondeterministicOps) as info:
            ctx.fit(model, _data(), stage="seg")
    finally:
        if not was_on:
            tf_config.disable_op_determinism()
    message = str(info.value)
    assert "stage 'seg'" in message and "ResizeNearestNeighborGrad" in message
    assert "'decoder_up'" in message and "--set train.deterministic=false" in message
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # nothing trained


@pytest.mark.parametrize(
    "setting, gpus, expected",
    [("auto", [], True), ("auto", ["gpu"], False), ("true", ["gpu"], True), ("false", [], False)],
)
def test_determinism_setting_per_machine(monkeypatch, caplog, setting, gpus, expected):
    from drkeras.experiment import resolve_determinism

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    with caplog.at_level("INFO", logger="drkeras"):
        assert resolve_determinism(setting) is expected
    said = "op determinism is off on GPUs" in caplog.text
    assert said is (setting == "auto" and bool(gpus))  # one log line, only when auto turns it off


def test_deterministic_setting_is_checked_and_bools_are_accepted():
    from drkeras.config import ConfigError, apply_overrides

    assert TrainConfig().deterministic == "auto"
    assert TrainConfig(deterministic=False).deterministic == "false"
    config = apply_overrides(Config(method=None), ["train.deterministic=true"])
    assert config.train.deterministic == "true"
    with pytest.raises(ConfigError, match="train.deterministic: expected 'auto', 'true' or"):
        apply_overrides(Config(method=None), ["train.deterministic=yes please"])
