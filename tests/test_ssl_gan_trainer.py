"""The patch SSL-GAN trainer (Lecouat et al. 2018, Sec. 2): the trainer tests of docs/design.md
section 6."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import losses
from drkeras.models import ssl_gan as nets
from drkeras.training.ssl_gan import LABELED, UNLABELED, PatchSSLGANTrainer

LOG_KEYS = {"d_loss", "sup_loss", "unsup_loss", "fm_loss", "accuracy"}


def _nets(dropout=0.0):
    def disc(name):
        return nets.build_discriminator(
            input_shape=(32, 32, 3), width=1 / 16, input_dropout=dropout, dropout=dropout,
            name=name,
        )  # fmt: skip

    return disc("d"), nets.build_generator(width=1 / 32), disc("d_ema")


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x_l = rng.uniform(0, 0.5, (n, 32, 32, 3)).astype(np.float32)
    x_l[labels == 1, 10:20, 10:20, 0] = 1.0  # a bright "lesion" in diseased patches
    x_u = rng.uniform(0, 0.5, (n, 32, 32, 3)).astype(np.float32)
    x_u[::2, 5:15, 5:15, 0] = 1.0
    return {LABELED: tf.constant(x_l), UNLABELED: tf.constant(x_u)}, tf.constant(labels, tf.int32)


def _adam(lr):
    return keras.optimizers.Adam(lr, beta_1=0.5)


def _trainer(
    *, d_lr=1e-3, g_lr=1e-3, ema_decay=0.9, dropout=0.0, init=True, optimizer=_adam, **kwargs
):
    d, g, ema = _nets(dropout)
    trainer = PatchSSLGANTrainer(d, g, ema_discriminator=ema, noise_seed=3)
    trainer.compile(
        d_optimizer=optimizer(d_lr),
        g_optimizer=optimizer(g_lr),
        ema_decay=ema_decay,
        **kwargs,
    )
    if init:
        trainer.initialize(_batch(16, seed=5)[0][UNLABELED])
    return trainer


def _values(variables):
    return [v.numpy().copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def _ema_supervised_loss(trainer, x, y):
    logits = trainer.ema_discriminator(x, training=False)["class_logits"]
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)))


def test_steps_own_their_networks_the_ema_is_evaluated_and_the_loss_goes_down():
    trainer = _trainer(d_lr=3e-3, ema_decay=0.5)
    x, y = _batch()
    d_vars = trainer.discriminator.trainable_variables
    g_vars = trainer.generator.trainable_variables
    pairs = trainer.weight_pairs
    assert len(pairs) == len(trainer.discriminator.weights)
    for ema, raw in pairs:  # initialize() copied D into the average
        np.testing.assert_array_equal(ema.numpy(), raw.numpy())
    d0, g0, ema0 = _values(d_vars), _values(g_vars), _values([e for e, _ in pairs])
    before = _ema_supervised_loss(trainer, x[LABELED], y)

    trainer.discriminator_step(x[LABELED], y, x[UNLABELED])
    assert all(_changed(d0, d_vars)) and not any(_changed(g0, g_vars))
    assert int(trainer.d_optimizer.iterations) == 1 and int(trainer.g_optimizer.iterations) == 0
    # D_ema <- 0.5 D_ema + 0.5 D on the trainable weights; the rest was copied once
    trainable = {id(v) for v in d_vars}
    for start, (ema, raw) in zip(ema0, pairs):
        expected = 0.5 * start + 0.5 * raw.numpy() if id(raw) in trainable else start
        np.testing.assert_allclose(ema.numpy(), expected, rtol=1e-5, atol=1e-7)

    d1 = _values(d_vars)
    trainer.generator_step(x[UNLABELED])
    assert all(_changed(g0, g_vars)) and not any(_changed(d1, d_vars))
    assert int(trainer.g_optimizer.iterations) == 1

    history = trainer.fit(tf.data.Dataset.from_tensors((x, y)).repeat(20), epochs=1, verbose=0)
    assert set(history.history) == LOG_KEYS
    assert all(np.isfinite(v[-1]) for v in history.history.values())
    assert int(trainer.d_optimizer.iterations) == 21 and int(trainer.g_optimizer.iterations) == 21

    # The average lags the raw weights, and it is what call() and evaluate() use.
    raw = trainer.discriminator(x[LABELED], training=False)["class_logits"].numpy()
    ema = trainer.ema_discriminator(x[LABELED], training=False)["class_logits"].numpy()
    assert np.abs(raw - ema).max() > 1e-4
    np.testing.assert_allclose(trainer(x[LABELED])["class_logits"].numpy(), ema, rtol=1e-6)
    result = trainer.evaluate(x[LABELED], y, verbose=0, return_dict=True)
    assert set(result) == {"sup_loss", "accuracy"}
    after = _ema_supervised_loss(trainer, x[LABELED], y)
    np.testing.assert_allclose(result["sup_loss"], after, rtol=1e-5)
    assert after < 0.7 * before


def test_every_trainable_variable_gets_a_gradient():
    trainer = _trainer(dropout=0.2)
    x, y = _batch()
    fake = trainer.generator(trainer.noise(8, 0, 0), training=True)
    with tf.GradientTape() as tape:
        sup, unsup, _ = trainer.discriminator_losses(x[LABELED], y, x[UNLABELED], fake)
        loss = losses.global_mean(sup, 8) + losses.global_mean(unsup, 8)
    d_grads = tape.gradient(loss, trainer.discriminator.trainable_variables)
    with tf.GradientTape() as tape:
        fm = trainer.feature_matching_loss(x[UNLABELED], trainer.noise(8, 0, 1))
    g_grads = tape.gradient(fm, trainer.generator.trainable_variables)
    assert len(d_grads) + len(g_grads) == len(trainer.trainable_variables)
    for grad, var in zip(
        d_grads + g_grads,
        trainer.discriminator.trainable_variables + trainer.generator.trainable_variables,
    ):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0.0, var.name
    # the supervised and unsupervised terms are the paper's L_D (Sec. 2)
    ref_sup, ref_unsup = losses.ssl_gan_losses(
        trainer.discriminator(x[LABELED], training=True)["class_logits"], y,
        trainer.discriminator(x[UNLABELED], training=True)["class_logits"],
        trainer.discriminator(fake, training=True)["class_logits"],
    )  # fmt: skip
    assert ref_sup.shape == sup.shape and ref_unsup.shape == unsup.shape


def test_bad_arguments_and_data():
    trainer = _trainer(init=False)
    for bad in ({"optimizer": "adam"}, {"loss": "mse"}):
        with pytest.raises(TypeError, match="ambiguous"):
            trainer.compile(
                d_optimizer=keras.optimizers.Adam(), g_optimizer=keras.optimizers.Adam(), **bad
            )
    with pytest.raises(ValueError, match="fm_norm"):
        trainer.compile(
            d_optimizer=keras.optimizers.Adam(), g_optimizer=keras.optimizers.Adam(), fm_norm="l3"
        )
    x, y = _batch()
    with pytest.raises(ValueError, match="unlabeled"):
        trainer.train_step((x[LABELED], y))
    d, _, ema = _nets()
    with pytest.raises(ValueError, match="does not match"):
        PatchSSLGANTrainer(
            d, nets.build_generator(width=1 / 32, output_size=48), ema_discriminator=ema
        )
    with pytest.raises(ValueError, match="dict outputs"):
        PatchSSLGANTrainer(nets.build_generator(width=1 / 32), d)
    # without an explicit average network, a clone of the discriminator is used
    cloned = PatchSSLGANTrainer(d, nets.build_generator(width=1 / 32))
    assert cloned.ema_discriminator is not d and not cloned.ema_discriminator.trainable


def _replica_trainer(strategy, weights=None, run_eagerly=True):
    with strategy.scope():
        # SGD: Adam's first step is lr * sign(grad), which hides differences in the gradients.
        trainer = _trainer(
            d_lr=0.05, g_lr=0.05, optimizer=keras.optimizers.SGD, run_eagerly=run_eagerly
        )
        if weights is not None:
            for net, values in zip(
                (trainer.discriminator, trainer.generator, trainer.ema_discriminator), weights
            ):
                net.set_weights(values)
    return trainer


# Traced (the paper preset's mode: a tf.function per step) and eager (the smoke preset's).
@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "traced"])
def test_one_and_two_replicas_give_the_same_update(two_replicas, run_eagerly):
    x, y = _batch()
    single = _replica_trainer(tf.distribute.get_strategy(), run_eagerly=run_eagerly)
    nets_of = (single.discriminator, single.generator, single.ema_discriminator)
    start = [net.get_weights() for net in nets_of]
    double = _replica_trainer(two_replicas, start, run_eagerly=run_eagerly)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(2)
    single.fit(ds, epochs=1, verbose=0, shuffle=False)
    double.fit(ds, epochs=1, verbose=0, shuffle=False)
    for w0s, net_a, net_b in zip(
        start, nets_of, (double.discriminator, double.generator, double.ema_discriminator)
    ):
        for w0, a, b in zip(w0s, net_a.get_weights(), net_b.get_weights()):
            if w0.dtype == bool:  # weight norm's "initialized" flags
                assert a and b
                continue
            delta_a, delta_b = a - w0, b - w0
            scale = max(np.abs(delta_a).max(), 1e-12)
            np.testing.assert_allclose(delta_b, delta_a, rtol=1e-3, atol=2e-3 * scale)
    assert any(np.abs(a - w0).max() > 0 for a, w0 in zip(single.generator.get_weights(), start[1]))


def test_traced_and_eager_steps_are_equal():
    x, y = _batch()
    eager = _replica_trainer(tf.distribute.get_strategy(), run_eagerly=True)
    nets = (eager.discriminator, eager.generator, eager.ema_discriminator)
    start = [net.get_weights() for net in nets]
    traced = _replica_trainer(tf.distribute.get_strategy(), start, run_eagerly=False)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(2)
    logs_eager = eager.fit(ds, epochs=1, verbose=0, shuffle=False).history
    logs_traced = traced.fit(ds, epochs=1, verbose=0, shuffle=False).history
    assert set(logs_traced) == set(logs_eager)
    for key in logs_eager:
        np.testing.assert_allclose(logs_traced[key], logs_eager[key], rtol=1e-4, err_msg=key)
    moved = 0
    for net_a, net_b, w0s in zip(
        nets, (traced.discriminator, traced.generator, traced.ema_discriminator), start
    ):
        for w0, a, b in zip(w0s, net_a.get_weights(), net_b.get_weights()):
            if w0.dtype == bool:
                continue
            moved += int(np.abs(a - w0).max() > 0)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(np.abs(a).max(), 1.0))
    assert moved > 0
