"""The cooperative trainer (docs/design.md section 6): log keys, both optimizers, variable
ownership, the shared encoder moved by both agents at their own rates, gradients everywhere, loss
going down and one vs two replicas."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.config import OptimizerConfig
from drkeras.data.pipeline import CLS_IMAGE, SEG_IMAGE
from drkeras.models.cooperative import build_cooperative_model
from drkeras.training.cooperative import (
    SEG_TARGET,
    CooperativeTrainer,
    agent_optimizer_configs,
    agent_optimizers,
)
from drkeras.training.optim import learning_rate

SIZE, CLASSES, SEG_BATCH, RATIO = 16, 3, 2, 2
LOG_KEYS = {"loss", "seg_loss", "grade_loss"}


def _network(encoder_widths=(4,)):
    # one encoder level (and so one decoder stage with partial attention): the smallest full
    # M / C / S, whose eager steps keep these tests fast
    return build_cooperative_model(
        input_shape=(SIZE, SIZE, 3),
        num_seg_classes=CLASSES,
        encoder_widths=encoder_widths,
        encoder_blocks=1,
        classifier_widths=(8,),
        classifier_blocks=1,
        name="tiny_jointseg",
    )


def _trainer(clf_lr=0.1, seg_lr=0.1, momentum=0.0, network=None, run_eagerly=True):
    # Eager steps: tracing this train step (two forward and backward passes through the
    # inception blocks) takes ~20 s on 2 CPU cores, an eager step well under a second.
    trainer = CooperativeTrainer.from_model(network or _network())
    trainer.compile(
        clf_optimizer=keras.optimizers.SGD(clf_lr, momentum=momentum),
        seg_optimizer=keras.optimizers.SGD(seg_lr, momentum=momentum),
        run_eagerly=run_eagerly,
    )
    return trainer


def _batch(seed=0, seg_batch=SEG_BATCH, ratio=RATIO):
    rng = np.random.default_rng(seed)
    n_cls = seg_batch * ratio
    classes = np.zeros((seg_batch, SIZE, SIZE), np.int64)
    seg_image = rng.normal(0, 1, (seg_batch, SIZE, SIZE, 3)).astype(np.float32)
    for i in range(seg_batch):
        r, c = rng.integers(0, SIZE - 6, 2)
        classes[i, r : r + 6, c : c + 6] = 1 + i % (CLASSES - 1)
        seg_image[i, r : r + 6, c : c + 6, i % 3] += 2.0  # a visible lesion
    x = {
        SEG_IMAGE: seg_image,
        CLS_IMAGE: rng.normal(0, 1, (n_cls, SIZE, SIZE, 3)).astype(np.float32),
    }
    y = {
        SEG_TARGET: np.eye(CLASSES, dtype=np.float32)[classes],
        keys.GRADE: rng.integers(0, 5, n_cls).astype(np.int32),
    }
    return x, y


def _step(trainer, data):
    """One training step through fit (``train_on_batch`` refuses inputs of different batch
    sizes); returns its logs."""
    history = trainer.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0)
    return {k: v[-1] for k, v in history.history.items()}


def _values(variables):
    return [v.numpy().copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def test_train_step_logs_both_optimizers_and_every_variable_moves():
    trainer = _trainer(momentum=0.9)
    x, y = _batch()
    before = _values(trainer.trainable_variables)
    logs = _step(trainer, (x, y))
    assert set(logs) == LOG_KEYS
    assert all(np.isfinite(v) for v in logs.values())
    np.testing.assert_allclose(logs["loss"], logs["seg_loss"] + logs["grade_loss"], rtol=1e-5)
    assert int(trainer.clf_optimizer.iterations) == 1
    assert int(trainer.seg_optimizer.iterations) == 1
    assert all(_changed(before, trainer.trainable_variables))
    # every trainable variable gets a nonzero gradient from the agent(s) that own it
    result = trainer.agent_gradients((x, y))
    for grads, variables in (
        (result["clf_grads"], trainer.clf_variables),
        (result["seg_grads"], trainer.seg_variables),
    ):
        assert len(grads) == len(variables)
        for g, v in zip(grads, variables):
            assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0.0, v.name
    covered = {id(v) for v in trainer.clf_variables + trainer.seg_variables}
    assert covered == {id(v) for v in trainer.trainable_variables}


@pytest.mark.parametrize("frozen", ["clf", "seg"])
def test_each_optimizer_moves_its_agent_and_both_move_the_shared_encoder(frozen):
    trainer = _trainer(
        clf_lr=0.0 if frozen == "clf" else 0.1, seg_lr=0.0 if frozen == "seg" else 0.1
    )
    encoder, classifier, segmenter = trainer.encoder, trainer.classifier, trainer.segmenter
    before = {m.name: _values(m.trainable_variables) for m in (encoder, classifier, segmenter)}
    _step(trainer, _batch())
    moved = {
        m.name: _changed(before[m.name], m.trainable_variables)
        for m in (encoder, classifier, segmenter)
    }
    # the encoder still moves through the other agent's optimizer
    assert all(moved[encoder.name])
    if frozen == "clf":
        assert not any(moved[classifier.name]) and all(moved[segmenter.name])
    else:
        assert all(moved[classifier.name]) and not any(moved[segmenter.name])


def test_shared_encoder_update_is_both_agents_gradients_at_their_own_rates():
    seg_lr, ratio = 0.01, 30.0
    clf_cfg, seg_cfg = agent_optimizer_configs(
        OptimizerConfig(name="sgd", learning_rate=seg_lr), ratio
    )
    assert clf_cfg.learning_rate == pytest.approx(0.3) and seg_cfg.learning_rate == seg_lr
    trainer = CooperativeTrainer.from_model(_network())
    clf_opt, seg_opt = agent_optimizers(seg_cfg, ratio)
    trainer.compile(clf_optimizer=clf_opt, seg_optimizer=seg_opt, run_eagerly=True)
    data = _batch(1)
    grads = trainer.agent_gradients(data)
    clf_g = {id(v): g.numpy() for v, g in zip(trainer.clf_variables, grads["clf_grads"])}
    seg_g = {id(v): g.numpy() for v, g in zip(trainer.seg_variables, grads["seg_grads"])}
    before = {id(v): v.numpy().copy() for v in trainer.trainable_variables}
    _step(trainer, data)
    zero = 0.0
    for v in trainer.trainable_variables:
        expected = -0.3 * clf_g.get(id(v), zero) - seg_lr * seg_g.get(id(v), zero)
        np.testing.assert_allclose(
            v.numpy() - before[id(v)], expected, rtol=1e-4, atol=1e-6, err_msg=v.name
        )
    encoder_var = trainer.encoder.trainable_variables[0]
    assert id(encoder_var) in clf_g and id(encoder_var) in seg_g


def test_learning_rate_ratio_holds_along_the_polynomial_schedule():
    seg = OptimizerConfig(
        name="sgd",
        learning_rate=1e-3,
        end_learning_rate=1e-5,
        momentum=0.9,
        nesterov=True,
        schedule="polynomial",
        decay_steps=100,
        power=0.9,
    )
    clf_cfg, seg_cfg = agent_optimizer_configs(seg, 30.0)
    assert clf_cfg.end_learning_rate == pytest.approx(3e-4)
    clf_schedule, seg_schedule = learning_rate(clf_cfg), learning_rate(seg_cfg)
    for step in (0, 37, 100):
        ratio = float(clf_schedule(step)) / float(seg_schedule(step))
        assert ratio == pytest.approx(30.0, rel=1e-5)
    assert float(seg_schedule(50)) < 1e-3
    clf_opt, seg_opt = agent_optimizers(seg, 30.0)
    assert clf_opt.nesterov and seg_opt.nesterov
    assert float(clf_opt.learning_rate) == pytest.approx(30.0 * float(seg_opt.learning_rate))
    with pytest.raises(ValueError, match="lr_ratio"):
        agent_optimizer_configs(seg, 0.0)


def _fresh_training_losses(trainer, x, y):
    """Both agents' losses re-computed on the batch with the current weights, batch norm in
    training mode (batch statistics, the objective the optimizers minimise)."""
    grade = trainer._grade_loss(x[CLS_IMAGE], y[keys.GRADE], training=True)
    seg = trainer._seg_loss(x[SEG_IMAGE], y[SEG_TARGET], training=True)
    return float(tf.reduce_mean(grade)), float(tf.reduce_mean(seg))


def test_fresh_evaluation_losses_go_down_after_20_steps():
    trainer = _trainer(clf_lr=0.05, seg_lr=0.05, momentum=0.9)
    x, y = _batch(2)
    ds = tf.data.Dataset.from_tensors((x, y))
    before = trainer.evaluate(ds, verbose=0, return_dict=True)
    fresh_before = _fresh_training_losses(trainer, x, y)
    assert set(before) == LOG_KEYS
    trainer.fit(ds.repeat(20), epochs=1, verbose=0)
    after = trainer.evaluate(ds, verbose=0, return_dict=True)
    assert after["seg_loss"] < 0.7 * before["seg_loss"]
    assert after["loss"] < 0.7 * before["loss"]
    # Inference mode uses batch norm's moving statistics, which after 20 steps (momentum 0.99)
    # still lag the weights; with batch statistics both agents have fit the batch.
    fresh_after = _fresh_training_losses(trainer, x, y)
    assert fresh_after[0] < 0.5 * fresh_before[0]
    assert fresh_after[1] < 0.5 * fresh_before[1]
    out = trainer(x[SEG_IMAGE])
    assert out[keys.SEG_PROBS].shape == (SEG_BATCH, SIZE, SIZE, CLASSES)


def test_bad_arguments_and_data_give_clear_errors():
    trainer = CooperativeTrainer.from_model(_network())
    for bad in ({"optimizer": "sgd"}, {"loss": "mse"}):
        with pytest.raises(TypeError, match="ambiguous"):
            trainer.compile(
                clf_optimizer=keras.optimizers.SGD(), seg_optimizer=keras.optimizers.SGD(), **bad
            )
    trainer = _trainer()
    x, y = _batch()
    with pytest.raises(ValueError, match="seg_image"):
        trainer.agent_gradients((x[SEG_IMAGE], y))
    with pytest.raises(ValueError, match="grade"):
        trainer.agent_gradients((x, {SEG_TARGET: y[SEG_TARGET]}))
    wrong = dict(y, **{SEG_TARGET: np.zeros((SEG_BATCH, SIZE, SIZE, CLASSES + 1), np.float32)})
    with pytest.raises(ValueError, match="classes"):
        trainer.agent_gradients((x, wrong))
    # integer class ids are one-hot encoded by the trainer
    ids = dict(y, **{SEG_TARGET: y[SEG_TARGET].argmax(-1)})
    np.testing.assert_allclose(
        trainer.agent_gradients((x, ids))["seg"].numpy(),
        trainer.agent_gradients((x, y))["seg"].numpy(),
        rtol=1e-6,
    )
    encoder = trainer.encoder
    with pytest.raises(ValueError, match="encoder_output"):
        CooperativeTrainer(trainer.classifier, trainer.classifier, trainer.segmenter)
    with pytest.raises(ValueError, match="lesion_logits"):
        CooperativeTrainer(encoder, trainer.classifier, trainer.classifier)


def _network_weights(trainer, trainable=False):
    # the networks' weights (batch norm statistics included unless ``trainable``), not the
    # loss trackers' totals
    agents = (trainer.encoder, trainer.classifier, trainer.segmenter)
    if trainable:
        return [v.numpy() for m in agents for v in m.trainable_variables]
    return [w for m in agents for w in m.get_weights()]


def _replica_trainer(strategy, weights=None, run_eagerly=True):
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        trainer = _trainer(
            clf_lr=0.3, seg_lr=0.01, momentum=0.9, network=_network(), run_eagerly=run_eagerly
        )
        if weights is not None:
            for model in (trainer.encoder, trainer.classifier, trainer.segmenter):
                count = len(model.get_weights())
                model.set_weights(weights[:count])
                weights = weights[count:]
    return trainer


# Traced (the paper preset's mode: a tf.function per step) and eager (the smoke preset's).
@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "traced"])
def test_one_and_two_replicas_give_the_same_update(two_replicas, run_eagerly):
    x, y = _batch(3, seg_batch=4, ratio=2)  # global batches: 4 segmentation, 8 classification
    # two batched streams zipped, as drkeras.data.pipeline.two_stream_dataset builds them
    seg = tf.data.Dataset.from_tensor_slices((x[SEG_IMAGE], y[SEG_TARGET])).batch(4)
    cls = tf.data.Dataset.from_tensor_slices((x[CLS_IMAGE], y[keys.GRADE])).batch(8)
    data = (
        tf.data.Dataset.zip((seg, cls))
        .map(
            lambda s, c: (
                {SEG_IMAGE: s[0], CLS_IMAGE: c[0]},
                {SEG_TARGET: s[1], keys.GRADE: c[1]},
            )
        )
        .repeat(2)
    )
    single = _replica_trainer(tf.distribute.OneDeviceStrategy("/cpu:0"), run_eagerly=run_eagerly)
    start = _network_weights(single)
    start_trainable = _network_weights(single, trainable=True)
    double = _replica_trainer(two_replicas, start, run_eagerly=run_eagerly)
    logs_1 = single.fit(data, epochs=1, verbose=0, shuffle=False).history
    logs_2 = double.fit(data, epochs=1, verbose=0, shuffle=False).history
    for optimizer in (double.clf_optimizer, double.seg_optimizer):
        assert int(optimizer.iterations.numpy()) == 2
    # The optimizers' update: every trainable variable. (Batch norm's moving variance is left
    # out: one replica runs the fused kernel, whose moving variance carries Bessel's
    # correction, two replicas the synchronised one, which does not.)
    moved = 0
    pairs = zip(_network_weights(single, True), _network_weights(double, True))
    for w0, (a, b) in zip(start_trainable, pairs):
        delta_a, delta_b = a - w0, b - w0
        moved += int(np.abs(delta_a).max() > 0)
        np.testing.assert_allclose(
            delta_b, delta_a, rtol=1e-3, atol=1e-6 + 1e-3 * np.abs(delta_a).max()
        )
    assert moved == len(start_trainable)
    for key in LOG_KEYS:
        np.testing.assert_allclose(logs_2[key], logs_1[key], rtol=1e-4, err_msg=key)


def test_traced_and_eager_steps_are_equal():
    data = tf.data.Dataset.from_tensors(_batch(5)).repeat(2)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    eager = _replica_trainer(strategy, run_eagerly=True)
    start = _network_weights(eager)
    traced = _replica_trainer(strategy, start, run_eagerly=False)
    logs_eager = eager.fit(data, epochs=1, verbose=0, shuffle=False).history
    logs_traced = traced.fit(data, epochs=1, verbose=0, shuffle=False).history
    for key in LOG_KEYS:
        np.testing.assert_allclose(logs_traced[key], logs_eager[key], rtol=1e-5, err_msg=key)
    after_eager, after_traced = _network_weights(eager), _network_weights(traced)
    assert any(not np.array_equal(a, w0) for a, w0 in zip(after_eager, start))
    for a, b in zip(after_eager, after_traced):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
