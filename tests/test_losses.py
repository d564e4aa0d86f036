"""Losses: exact hand values, cross-checks with tf.keras.losses, distributed reduction."""

import math

import numpy as np
import pytest
import tensorflow as tf

from drkeras import losses as L

LOG2 = math.log(2.0)


def _np(x):
    return np.asarray(x, np.float64)


def test_binary_crossentropy_hand_and_keras():
    loss = L.binary_crossentropy([[1.0, 0.0]], [[0.5, 0.25]])
    assert loss.shape == (1,)
    assert float(loss[0]) == pytest.approx((LOG2 - math.log(0.75)) / 2, rel=1e-6)
    rng = np.random.default_rng(0)
    y = (rng.random((3, 5, 5, 2)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(3, 5, 5, 2)).astype(np.float32)
    ref = tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")(y, logits)
    ref = tf.reduce_mean(ref, axis=[1, 2])  # keras averages the last axis only
    np.testing.assert_allclose(L.binary_crossentropy(y, logits, from_logits=True), ref, rtol=1e-5)
    np.testing.assert_allclose(
        L.binary_crossentropy(y, tf.sigmoid(logits)), ref, rtol=1e-4, atol=1e-6
    )


def test_weighted_bce_hand_and_logit_path():
    loss = L.weighted_binary_crossentropy([[1.0, 0.0]], [[0.5, 0.5]], pos_weight=3.0)
    assert float(loss[0]) == pytest.approx((3 * LOG2 + LOG2) / 2, rel=1e-6)
    rng = np.random.default_rng(1)
    y = (rng.random((2, 4, 4, 3)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    w = [1.0, 5.0, 10.0]
    a = L.weighted_binary_crossentropy(y, logits, pos_weight=w, from_logits=True)
    b = L.weighted_binary_crossentropy(y, tf.sigmoid(logits), pos_weight=w)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    # pos_weight 1 is plain BCE
    np.testing.assert_allclose(
        L.weighted_binary_crossentropy(y, logits, pos_weight=1.0, from_logits=True),
        L.binary_crossentropy(y, logits, from_logits=True),
        rtol=1e-6,
    )


def test_categorical_crossentropy_matches_keras():
    rng = np.random.default_rng(2)
    y = tf.one_hot(rng.integers(0, 5, 8), 5)
    logits = rng.normal(size=(8, 5)).astype(np.float32)
    ref = tf.keras.losses.categorical_crossentropy(y, logits, from_logits=True)
    np.testing.assert_allclose(L.categorical_crossentropy(y, logits, from_logits=True), ref, 1e-5)
    np.testing.assert_allclose(L.categorical_crossentropy(y, tf.nn.softmax(logits)), ref, 1e-5)
    assert float(L.categorical_crossentropy([[0.0, 1.0]], [[0.75, 0.25]])[0]) == pytest.approx(
        -math.log(0.25), rel=1e-6
    )


def test_categorical_focal_hand_keras_and_reduces_to_ce():
    # p_t = 0.5: 0.25 * 0.5^2 * log 2
    v = L.categorical_focal_loss([[1.0, 0.0]], [[0.5, 0.5]])
    assert float(v[0]) == pytest.approx(0.25 * 0.25 * LOG2, rel=1e-6)
    rng = np.random.default_rng(3)
    y = tf.one_hot(rng.integers(0, 4, (2, 3, 3)), 4)
    logits = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    probs = tf.nn.softmax(logits)
    ce = L.categorical_crossentropy(y, probs)
    np.testing.assert_allclose(
        L.categorical_focal_loss(y, probs, alpha=1.0, gamma=0.0), ce, rtol=1e-6
    )
    keras_fl = tf.keras.losses.CategoricalFocalCrossentropy(
        alpha=0.25, gamma=2.0, from_logits=True, reduction="none"
    )(y, logits)
    np.testing.assert_allclose(
        L.categorical_focal_loss(y, logits, from_logits=True),
        tf.reduce_mean(keras_fl, axis=[1, 2]),
        rtol=1e-5,
    )
    # per-class alpha: class weights multiply the true-class term
    w = L.categorical_focal_loss([[0.0, 1.0]], [[0.5, 0.5]], alpha=[0.1, 2.0], gamma=0.0)
    assert float(w[0]) == pytest.approx(2.0 * LOG2, rel=1e-6)
    # focusing: a confident correct prediction is down-weighted far more than by CE
    easy = float(L.categorical_focal_loss([[1.0, 0.0]], [[0.9, 0.1]], alpha=1.0)[0])
    assert easy == pytest.approx(0.01 * -math.log(0.9), rel=1e-5)


def test_binary_focal_hand_keras_and_reduces_to_bce():
    assert float(L.binary_focal_loss([[1.0]], [[0.5]])[0]) == pytest.approx(0.0625 * LOG2, 1e-6)
    assert float(L.binary_focal_loss([[0.0]], [[0.5]])[0]) == pytest.approx(0.75 * 0.25 * LOG2)
    rng = np.random.default_rng(4)
    y = (rng.random((3, 4, 4, 2)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    np.testing.assert_allclose(
        L.binary_focal_loss(y, logits, alpha=None, gamma=0.0, from_logits=True),
        L.binary_crossentropy(y, logits, from_logits=True),
        rtol=1e-5,
    )
    ref = tf.keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True, reduction="none"
    )(y, logits)
    np.testing.assert_allclose(
        L.binary_focal_loss(y, logits, from_logits=True),
        tf.reduce_mean(ref, axis=[1, 2]),
        rtol=1e-5,
    )
    # logits path stays finite where probabilities would saturate
    big = L.binary_focal_loss([[1.0]], [[-80.0]], from_logits=True)
    assert float(big[0]) == pytest.approx(0.25 * 80.0, rel=1e-4)


def test_dice_loss_hand_values_and_empty_masks():
    ones = tf.ones([1, 2, 2, 1])
    # 1 - (2*2 + 1) / (4 + 2 + 1)
    assert float(L.dice_loss(ones, ones * 0.5)[0]) == pytest.approx(1 - 5 / 7, rel=1e-6)
    empty = tf.zeros([2, 3, 3, 2])
    np.testing.assert_allclose(L.dice_loss(empty, empty), [0.0, 0.0])
    # empty target, predicted 1 everywhere (9 px): (0 + 1) / (0 + 9 + 1) per channel
    assert float(L.dice_loss(empty, tf.ones_like(empty))[0]) == pytest.approx(0.9, rel=1e-6)
    # channels averaged: channel 0 perfect (loss 0), channel 1 empty target & full prediction
    y = np.zeros([1, 2, 2, 2], np.float32)
    y[..., 0] = 1
    p = np.ones_like(y)
    assert float(L.dice_loss(y, p)[0]) == pytest.approx((0.0 + (1 - 1 / 5)) / 2, rel=1e-6)
    # smooth=0 on perfect overlap is exactly 0
    assert float(L.dice_loss(ones, ones, smooth=0.0)[0]) == 0.0


def test_adversarial_and_feature_matching():
    assert float(L.adversarial_loss([[0.0]], True)[0]) == pytest.approx(LOG2)
    logits = tf.constant([[[2.0], [-1.0]]])  # [1, 2, 1] dense discriminator map
    real = L.adversarial_loss(logits, True)
    fake = L.adversarial_loss(logits, False)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert float(real[0]) == pytest.approx((sp(-2.0) + sp(1.0)) / 2, rel=1e-6)
    assert float(fake[0]) == pytest.approx((sp(2.0) + sp(-1.0)) / 2, rel=1e-6)
    r = np.array([[1.0, 3.0], [3.0, 5.0]])  # means 2, 4
    f = np.array([[0.0, 1.0]])  # means 0, 1
    assert float(L.feature_matching_loss(r, f, norm="l1")) == pytest.approx((2 + 3) / 2)
    assert float(L.feature_matching_loss(r, f)) == pytest.approx((4 + 9) / 2)
    with pytest.raises(ValueError, match="norm"):
        L.feature_matching_loss(r, f, norm="l3")


def test_ssl_gan_losses_hand_and_probability_form():
    sup, unsup = L.ssl_gan_losses([[0.0, 0.0]], [1], [[0.0, 0.0]], [[0.0, 0.0]])
    assert float(sup[0]) == pytest.approx(LOG2)
    # p(fake|x) = 1/3 for zero logits: -log(2/3) - log(1/3)
    assert float(unsup[0]) == pytest.approx(math.log(1.5) + math.log(3.0), rel=1e-6)
    rng = np.random.default_rng(5)
    lab, unl, fake = (rng.normal(size=(4, 3)) * 3 for _ in range(3))
    y = np.array([0, 2, 1, 1])
    sup, unsup = L.ssl_gan_losses(lab, y, unl, fake)

    def probs(logits):  # explicit K+1 softmax with the fake logit fixed at 0
        full = np.concatenate([logits, np.zeros((len(logits), 1))], axis=1)
        e = np.exp(full)
        return e / e.sum(1, keepdims=True)

    p_lab = probs(lab)[:, :3]
    p_lab = p_lab / p_lab.sum(1, keepdims=True)
    np.testing.assert_allclose(sup, -np.log(p_lab[np.arange(4), y]), rtol=1e-5)
    expected = -np.log(1 - probs(unl)[:, 3]) - np.log(probs(fake)[:, 3])
    np.testing.assert_allclose(unsup, expected, rtol=1e-5)
    # explicit fake column equal to 0 gives the same values
    zero = np.zeros((4, 1))
    sup2, unsup2 = L.ssl_gan_losses(
        np.hstack([lab, zero]),
        y,
        np.hstack([unl, zero]),
        np.hstack([fake, zero]),
        fake_logit="last",
    )
    np.testing.assert_allclose(sup2, sup, rtol=1e-6)
    np.testing.assert_allclose(unsup2, unsup, rtol=1e-6)
    # log-sum-exp keeps huge logits finite
    s, u = L.ssl_gan_losses([[500.0, 0.0]], [0], [[500.0, 0.0]], [[-500.0, -500.0]])
    assert np.isfinite(s).all() and np.isfinite(u).all() and float(u[0]) < 1e-6
    with pytest.raises(ValueError, match="same batch size"):
        L.ssl_gan_losses(lab, y, unl, fake[:2])


def test_global_mean_and_rank_check():
    assert float(L.global_mean(tf.constant([1.0, 3.0]), 4)) == 1.0
    with pytest.raises(ValueError, match="per-example"):
        L.global_mean(tf.zeros([2, 2]), 4)


def test_keras_loss_classes_config_and_fit_reduction():
    rng = np.random.default_rng(6)
    y = tf.one_hot(rng.integers(0, 3, 6), 3)
    p = tf.nn.softmax(rng.normal(size=(6, 3)).astype(np.float32))
    fl = L.CategoricalFocalLoss(alpha=[0.2, 0.3, 0.5], gamma=1.5)
    assert float(fl(y, p)) == pytest.approx(
        float(tf.reduce_mean(L.categorical_focal_loss(y, p, alpha=[0.2, 0.3, 0.5], gamma=1.5))),
        rel=1e-6,
    )
    for cls in (
        L.CategoricalFocalLoss,
        L.BinaryFocalLoss,
        L.DiceLoss,
        L.WeightedBinaryCrossentropy,
    ):
        obj = cls()
        clone = tf.keras.losses.deserialize(tf.keras.losses.serialize(obj))
        assert type(clone) is cls and clone.get_config() == obj.get_config()
    assert L.WeightedBinaryCrossentropy(pos_weight=7.0).get_config()["pos_weight"] == 7.0
    seg_t = (rng.random((2, 4, 4, 2)) < 0.5).astype(np.float32)
    seg_p = rng.random((2, 4, 4, 2)).astype(np.float32)
    sw = np.array([1.0, 0.0], np.float32)
    # sample weights act per example; the Keras default reduction divides by the batch size
    assert float(L.DiceLoss()(seg_t, seg_p, sample_weight=sw)) == pytest.approx(
        float(L.dice_loss(seg_t, seg_p)[0]) / 2, rel=1e-6
    )


def test_losses_go_down_when_fitting():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = tf.one_hot((x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int), 3)
    inputs = tf.keras.Input((4,), name="x")
    out = tf.keras.layers.Dense(3, activation="softmax", name="grade_probs")(inputs)
    model = tf.keras.Model(inputs, out)
    model.compile(tf.keras.optimizers.Adam(0.05), loss=L.CategoricalFocalLoss(gamma=2.0))
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=20, batch_size=32, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first


def test_global_mean_gradient_one_vs_two_replicas(two_replicas):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    y = (rng.random((8, 6, 6, 2)) < 0.3).astype(np.float32)
    kernel0 = rng.normal(size=(1, 1, 3, 2)).astype(np.float32)

    def per_example(kernel, xb, yb):
        logits = tf.nn.conv2d(xb, kernel, 1, "SAME")
        return L.binary_focal_loss(yb, logits, from_logits=True) + L.dice_loss(
            yb, tf.sigmoid(logits)
        )

    def grad_of(kernel, xb, yb):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            loss = L.global_mean(per_example(kernel, xb, yb), 8)
        return tape.gradient(loss, kernel)

    single = grad_of(tf.constant(kernel0), x, y)
    with two_replicas.scope():
        kernel = tf.Variable(kernel0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    batch = next(iter(two_replicas.experimental_distribute_dataset(data)))

    @tf.function
    def step(xb, yb):
        def replica(xr, yr):
            with tf.GradientTape() as tape:
                loss = L.global_mean(per_example(kernel, xr, yr), 8)
            return tape.gradient(loss, kernel)

        grads = two_replicas.run(replica, args=(xb, yb))
        return two_replicas.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None)

    distributed = step(*batch)
    assert two_replicas.num_replicas_in_sync == 2
    np.testing.assert_allclose(distributed, single, rtol=1e-5, atol=1e-7)
