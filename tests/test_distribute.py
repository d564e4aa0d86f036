"""Distribution through the runner: for every trainer, ``ctx.fit`` on one replica and on a
MirroredStrategy of two logical CPUs gives the same update and the same logged losses; models
built outside the scope are refused; the loss-scaling helpers, the resumable data stream and
the shared history file behave as documented."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras
from tiny_experiment import (
    TwoOptimizerTrainer,
    bilevel_data,
    build_mlp,
    build_tiny_multitask,
    make_data,
)

from drkeras import keys
from drkeras.config import Config, TrainConfig
from drkeras.experiment import RunContext
from drkeras.models.mtunet import compile_mtunet
from drkeras.models.pldmlt import build_label_update_net
from drkeras.training import distribute
from drkeras.training.bilevel import BilevelMultiTaskTrainer
from drkeras.training.callbacks import HistoryCSV
from drkeras.training.checkpoint import optimizers_of, resumable_data

BATCH = 4  # global batch: 2 examples per replica on two replicas


def _mtunet_losses(rng):
    # MTUnet trains with plain Keras fit (two outputs, two losses, loss_weights); its losses on
    # a small two-output network keep this fast.
    model = compile_mtunet(build_tiny_multitask(), alpha=0.5, lr=1e-2)
    images = rng.uniform(0, 1, (8, 16, 16, 3)).astype("float32")
    seg = np.eye(5, dtype="float32")[rng.integers(0, 5, (8, 16, 16))]
    grades = rng.integers(0, 5, 8)
    return model, (images, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grades})


def _bilevel(rng):
    trainer = BilevelMultiTaskTrainer(
        build_tiny_multitask(),
        build_label_update_net(input_shape=(16, 16, 3), widths=(4,), hidden=6),
    )
    trainer.compile(
        model_optimizer=keras.optimizers.Adam(0.01),
        label_optimizer=keras.optimizers.SGD(20.0),
        virtual_lr=0.5,
    )
    return trainer, bilevel_data(rng)


# Every trainer of drkeras.training, and Keras fit (MTUnet's losses); add new trainers here.
# (The test trainer of tiny_experiment is compared across two worker processes instead.)
TRAINERS = {"keras_fit_mtunet": _mtunet_losses, "bilevel": _bilevel}


def _train(factory, strategy, out_dir, weights=None):
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model, data = factory(np.random.default_rng(0))
        if weights is not None:
            model.set_weights(weights)
    start = model.get_weights()
    ctx = RunContext(Config(method=None, train=TrainConfig(epochs=2, verbose=0)), out_dir, strategy)
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(BATCH)
    history = ctx.fit(model, dataset, stage="train", checkpoint_steps=0)
    return model, start, history


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_one_and_two_replicas_give_the_same_update_and_logged_loss(name, two_replicas, tmp_path):
    single, start, history_1 = _train(
        TRAINERS[name], tf.distribute.OneDeviceStrategy("/cpu:0"), tmp_path / "one"
    )
    double, _, history_2 = _train(TRAINERS[name], two_replicas, tmp_path / "two", start)
    assert double.distribute_strategy is two_replicas
    for opt in optimizers_of(single).values():
        assert int(opt.iterations) == 4  # 2 epochs of 2 global batches
    moved = 0
    for w0, a, b in zip(start, single.get_weights(), double.get_weights()):
        delta_a, delta_b = a - w0, b - w0
        moved += int(np.abs(delta_a).max() > 0)
        np.testing.assert_allclose(
            delta_b, delta_a, rtol=1e-3, atol=1e-6 + 1e-3 * np.abs(delta_a).max()
        )
    assert moved >= len(start) // 2
    assert history_1.history.keys() == history_2.history.keys()
    for key, values in history_1.history.items():
        assert all(np.isfinite(values)), key
        np.testing.assert_allclose(history_2.history[key], values, rtol=1e-5, err_msg=key)


def test_model_built_outside_the_strategy_scope_is_refused(two_replicas, tmp_path):
    model = TwoOptimizerTrainer(build_mlp(0.0, "classifier"), build_mlp(0.0, "regressor"))
    model.compile(c_optimizer=keras.optimizers.Adam(), r_optimizer=keras.optimizers.SGD())
    data = make_data(0, 8)
    ctx = RunContext(Config(method=None), tmp_path, two_replicas)
    with pytest.raises(ValueError, match="not built inside the run's strategy scope"):
        ctx.fit(model, tf.data.Dataset.from_tensor_slices(data).batch(BATCH), stage="x")
    with two_replicas.scope():
        inner = build_mlp(0.0, "inner")
    outside_optimizer = keras.optimizers.Adam()
    inner.compile(outside_optimizer, "mse")
    with pytest.raises(ValueError, match="optimizer 'optimizer'"):
        distribute.check_built_in_scope(inner, two_replicas)
    assert distribute.worker_role(two_replicas) == distribute.WorkerRole()


def test_loss_scaling_helpers():
    sgd = keras.optimizers.SGD(0.1)
    assert distribute.loss_scale_optimizer(sgd, "float32") is sgd
    assert distribute.loss_scale_optimizer(sgd, "mixed_bfloat16") is sgd
    wrapped = distribute.loss_scale_optimizer(sgd, "mixed_float16")
    assert isinstance(wrapped, keras.mixed_precision.LossScaleOptimizer)
    assert distribute.loss_scale_optimizer(wrapped, "mixed_float16") is wrapped
    assert float(distribute.scale_loss(sgd, tf.constant(2.0))) == 2.0
    fixed = keras.mixed_precision.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), dynamic=False, initial_scale=8.0
    )
    assert float(distribute.scale_loss(fixed, tf.constant(2.0))) == 16.0
    grads = distribute.unscale_gradients(fixed, [tf.constant([16.0, 8.0]), None])
    np.testing.assert_array_equal(grads[0].numpy(), [2.0, 1.0])
    assert grads[1] is None


def test_resumable_data_makes_one_stream_per_stage():
    ds = tf.data.Dataset.range(10).batch(4)  # 3 batches
    stream, steps, exact = resumable_data(ds, None)
    assert (steps, exact) == (3, True)
    assert [int(b[0]) for b in stream.take(7)] == [0, 4, 8, 0, 4, 8, 0]
    stream, steps, exact = resumable_data(ds, 3)
    assert (steps, exact, int(stream.cardinality())) == (3, True, tf.data.INFINITE_CARDINALITY)
    stream, steps, _ = resumable_data(ds, 2)
    assert stream is ds and steps == 2  # one iterator across epochs already
    with pytest.raises(ValueError, match="repeats forever: give steps_per_epoch"):
        resumable_data(ds.repeat(), None)
    with pytest.raises(ValueError, match="empty"):
        resumable_data(ds.take(0), None)
    unknown = ds.filter(lambda b: True)
    assert resumable_data(unknown, None)[2] is False
    assert resumable_data(unknown, 3)[2] is True
    arrays = np.zeros((4, 2))
    assert resumable_data(arrays, None) == (arrays, None, False)


def test_history_replaces_an_epoch_logged_again(tmp_path):
    path = tmp_path / "history.csv"
    HistoryCSV(path, "joint").on_epoch_end(0, {"loss": 1.0})
    HistoryCSV(path, "joint").on_epoch_end(1, {"loss": 0.75})
    HistoryCSV(path, "joint").on_epoch_end(1, {"loss": 0.5})  # the resumed run's epoch 2
    assert path.read_text().splitlines() == ["stage,epoch,loss", "joint,1,1.0", "joint,2,0.5"]
