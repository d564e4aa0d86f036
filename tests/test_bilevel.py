"""PLDMLT stage 2: label update network, fused masks, stateless calls and the bilevel trainer."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.models.mtunet import build_vgg16_unet
from drkeras.models.pldmlt import (
    CORRECTED_GRADE,
    FUSED_CLASSES,
    GRADE_MASK,
    PSEUDO_GRADE,
    build_label_update_net,
    fuse_lesion_masks,
    make_training_pair,
    masked_softmax,
)
from drkeras.training.bilevel import BilevelMultiTaskTrainer, stateless_call, substituted_weights

MA, HE, EX, SE, OD = range(5)
SIZE = 16


# --------------------------------------------------------------------------- networks and masks


def test_fuse_lesion_masks_ids_priority_and_closing():
    masks = np.zeros((4, 6, 5), np.uint8)
    masks[0, 0, MA] = 1
    masks[0, 0, HE] = 1  # overlaps MA: MA wins
    masks[1, 1, HE] = 255
    masks[2, 2, EX] = 1
    masks[3, 3, SE] = 1
    masks[3, 3, EX] = 1  # EX before SE
    masks[0, 5, OD] = 1  # the optic disc is background
    ids = fuse_lesion_masks(masks).numpy()
    assert FUSED_CLASSES == ("background", "MA", "HE", "EX", "SE")
    expected = np.zeros((4, 6), np.uint8)
    expected[0, 0], expected[1, 1], expected[2, 2], expected[3, 3] = 1, 2, 3, 3
    np.testing.assert_array_equal(ids, expected)
    one_hot = fuse_lesion_masks(masks[None], one_hot=True).numpy()
    assert one_hot.shape == (1, 4, 6, 5)
    np.testing.assert_array_equal(one_hot[0].argmax(-1), expected)
    np.testing.assert_array_equal(fuse_lesion_masks(masks, class_set="lesions_od")[0, 5], 5)
    # Closing joins two exudate fragments one pixel apart; without it the gap stays.
    gap = np.zeros((5, 7, 5), np.uint8)
    gap[2, 1:3, EX] = 1
    gap[2, 4:6, EX] = 1
    np.testing.assert_array_equal(fuse_lesion_masks(gap).numpy()[2], [0, 3, 3, 0, 3, 3, 0])
    np.testing.assert_array_equal(
        fuse_lesion_masks(gap, closing_size=3).numpy()[2], [0, 3, 3, 3, 3, 3, 0]
    )
    ds = tf.data.Dataset.from_tensors(masks).map(lambda m: fuse_lesion_masks(m, closing_size=3))
    np.testing.assert_array_equal(next(iter(ds)).numpy(), fuse_lesion_masks(masks, closing_size=3))
    with pytest.raises(ValueError, match="order"):
        fuse_lesion_masks(np.zeros((4, 4, 4)))


def test_masked_softmax_eq4():
    logits = tf.constant([[1.0, 2.0, 3.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    mask = tf.constant([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = masked_softmax(logits, mask).numpy()
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(got[0], [e[0] / e.sum(), e[1] / e.sum(), 0.0, 0.0], atol=1e-6)
    # An all-zero mask leaves the row unconstrained.
    np.testing.assert_allclose(got[1], tf.nn.softmax(logits[1]).numpy(), atol=1e-6)


def test_label_update_net_respects_mask_and_reads_the_pseudo_grade():
    net = build_label_update_net(input_shape=(SIZE, SIZE, 3), widths=(4, 8), hidden=8)
    assert all(layer.name for layer in net.layers)
    image = tf.random.uniform((3, SIZE, SIZE, 3))
    mask = tf.constant([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], tf.float32)
    out = net({keys.IMAGE: image, PSEUDO_GRADE: tf.one_hot([1, 2, 3], 5), GRADE_MASK: mask})
    probs = out[CORRECTED_GRADE].numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert np.all(probs[mask.numpy() == 0] == 0.0)
    np.testing.assert_allclose(probs[2], [0, 0, 0, 1, 0], atol=1e-6)
    other = net({keys.IMAGE: image, PSEUDO_GRADE: tf.one_hot([2, 2, 3], 5), GRADE_MASK: mask})
    assert not np.allclose(other[CORRECTED_GRADE].numpy()[0], probs[0])


def test_make_training_pair():
    masks = np.zeros((2, 4, 4, 5), np.uint8)
    masks[1, 0, 0, HE] = 1
    x, y = make_training_pair(np.zeros((2, 4, 4, 3), np.float32), masks, [0, 3])
    np.testing.assert_array_equal(x[PSEUDO_GRADE].numpy(), np.eye(5)[[0, 3]])
    np.testing.assert_array_equal(x[GRADE_MASK].numpy(), np.ones((2, 5)))
    assert y.shape == (2, 4, 4, 5) and y.numpy()[1, 0, 0, 2] == 1.0


# ------------------------------------------------------------------------------ stateless call


def _tiny_multitask(dtype="float32", batchnorm=False):
    image = keras.Input((SIZE, SIZE, 3), dtype=dtype, name=keys.IMAGE)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", dtype=dtype, name="enc")(image)
    if batchnorm:
        x = keras.layers.BatchNormalization(dtype=dtype, name="enc_bn")(x)
    pooled = keras.layers.AveragePooling2D(2, dtype=dtype, name="enc_pool")(x)
    grade = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="grade_pool")(pooled)
    grade = keras.layers.Dense(5, activation="softmax", dtype=dtype, name=keys.GRADE_PROBS)(grade)
    up = keras.layers.Conv2DTranspose(
        4, 3, strides=2, padding="same", activation="tanh", dtype=dtype, name="dec_up"
    )(pooled)
    seg = keras.layers.Concatenate(dtype=dtype, name="dec_concat")([up, x])
    seg = keras.layers.Conv2D(5, 1, activation="softmax", dtype=dtype, name=keys.SEG_PROBS)(seg)
    return keras.Model(image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grade}, name="tiny_mt")


def test_stateless_call_equals_assigned_weights_and_changes_nothing():
    model = _tiny_multitask(batchnorm=True)
    x = tf.random.uniform((2, SIZE, SIZE, 3))
    theta = model.trainable_variables
    before = [w.numpy() for w in model.weights]
    new = [w + 0.1 * tf.random.normal(w.shape) for w in theta]
    out = stateless_call(model, theta, new, x, training=True)
    # Variables (BatchNorm moving statistics included) are untouched by a training-mode call.
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    assert [w.name for w in model.trainable_weights] == [w.name for w in theta]
    clone = _tiny_multitask(batchnorm=True)
    clone.set_weights(before)
    for var, value in zip(clone.trainable_variables, new):
        var.assign(value)
    expected = clone(x, training=True)
    for key in (keys.SEG_PROBS, keys.GRADE_PROBS):
        np.testing.assert_allclose(out[key].numpy(), expected[key].numpy(), atol=1e-6)
    # Gradients flow to the substituted tensors.
    with tf.GradientTape() as tape:
        tape.watch(new)
        loss = tf.reduce_sum(stateless_call(model, theta, new, x)[keys.GRADE_PROBS][:, 0])
    assert all(g is not None for g in tape.gradient(loss, new)[:2])
    with pytest.raises(ValueError, match="not attributes"):
        with substituted_weights(model, [tf.Variable(1.0, name="stranger")], [tf.constant(2.0)]):
            pass
    # The failed call restored everything.
    assert model.get_layer("enc").kernel is theta[0]


# ------------------------------------------------------------------------------------- trainer


def _batch(n=4, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(dtype)
    masks = np.zeros((n, SIZE, SIZE, 5), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, SIZE - 4, 2)
        masks[i, r : r + 4, c : c + 4, i % 4] = 1
    allowed = np.array([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    x, y = make_training_pair(image, masks, np.array([0, 1, 3, 4])[:n], allowed[:n])
    x = {k: tf.cast(v, dtype) for k, v in x.items()}
    return x, tf.cast(y, dtype)


def _random_correction(label_net, seed=0):
    """Give the label network's zero-initialised last layer random values, so that every one of
    its variables has a gradient from the first step (the tests of the meta-gradient's
    mechanics; a fresh network only moves its last layer in its first step)."""
    rng = np.random.default_rng(seed)
    for var in label_net.get_layer("label_correction").trainable_variables:
        var.assign(rng.normal(0.0, 0.5, var.shape).astype(var.dtype.as_numpy_dtype))
    return label_net


def _trainer(multitask=None, *, dtype="float32", model_lr=0.1, label_lr=0.1, **compile_kwargs):
    multitask = multitask or _tiny_multitask(dtype)
    previous = keras.backend.floatx()
    keras.backend.set_floatx(dtype)
    try:
        label_net = build_label_update_net(input_shape=(SIZE, SIZE, 3), widths=(4,), hidden=6)
    finally:
        keras.backend.set_floatx(previous)
    _random_correction(label_net)
    trainer = BilevelMultiTaskTrainer(multitask, label_net)
    compile_kwargs.setdefault("virtual_lr", 0.5)
    trainer.compile(
        model_optimizer=keras.optimizers.SGD(model_lr),
        label_optimizer=keras.optimizers.SGD(label_lr),
        **compile_kwargs,
    )
    return trainer


def test_meta_gradient_is_the_true_second_order_gradient():
    """grad_psi L_meta(theta - eps g(theta, psi)) against central finite differences (float64)."""
    trainer = _trainer(dtype="float64", beta=1.0)
    data = _batch(dtype=np.float64)
    grads = trainer.bilevel_gradients(data)["label_grads"]
    psi = trainer.label_network.trainable_variables
    assert all(float(tf.norm(g)) > 0.0 for g in grads)
    rng = np.random.default_rng(0)
    h = 1e-6
    checked = 0
    for var, grad in zip(psi, grads):
        if var.shape.rank < 1:
            continue
        grad = grad.numpy()
        # The largest entry and one random entry of every variable.
        flat_indices = [int(np.argmax(np.abs(grad))), int(rng.integers(grad.size))]
        for flat in flat_indices:
            index = np.unravel_index(flat, grad.shape)
            original = var.numpy()
            values = []
            for sign in (1.0, -1.0):
                shifted = original.copy()
                shifted[index] += sign * h
                var.assign(shifted)
                values.append(float(trainer.bilevel_gradients(data)["meta_loss_scaled"]))
            var.assign(original)
            numeric = (values[0] - values[1]) / (2 * h)
            np.testing.assert_allclose(grad[index], numeric, rtol=1e-4, atol=1e-10)
            checked += 1
    assert checked >= 8
    # A first-order shortcut (dropping d g / d psi) would give exactly zero here: the meta loss
    # depends on psi only through the virtual step.
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 1e-6


def test_train_step_logs_optimizers_and_variable_ownership():
    trainer = _trainer()
    data = _batch()
    theta0 = [w.numpy() for w in trainer.multitask.trainable_variables]
    psi0 = [w.numpy() for w in trainer.label_network.trainable_variables]
    result = trainer.bilevel_gradients(data)
    for g in result["model_grads"] + result["label_grads"]:
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0.0
    logs = trainer.train_on_batch(*data, return_dict=True)
    assert set(logs) == {"loss", "seg_loss", "grade_loss", "meta_loss"}
    assert all(np.isfinite(v) for v in logs.values())
    np.testing.assert_allclose(logs["loss"], logs["seg_loss"] + 0.8 * logs["grade_loss"], rtol=1e-5)
    assert int(trainer.model_optimizer.iterations) == 1
    assert int(trainer.label_optimizer.iterations) == 1
    for before, after in zip(theta0, trainer.multitask.trainable_variables):
        assert not np.allclose(before, after.numpy(), atol=0, rtol=0)
    for before, after in zip(psi0, trainer.label_network.trainable_variables):
        assert not np.allclose(before, after.numpy(), atol=0, rtol=0)

    # Each optimizer touches only its own network.
    frozen_labels = _trainer(label_lr=0.0)
    psi0 = [w.numpy() for w in frozen_labels.label_network.trainable_variables]
    frozen_labels.train_on_batch(*data)
    for before, after in zip(psi0, frozen_labels.label_network.trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())
    frozen_model = _trainer(model_lr=0.0)
    theta0 = [w.numpy() for w in frozen_model.multitask.trainable_variables]
    psi0 = [w.numpy() for w in frozen_model.label_network.trainable_variables]
    frozen_model.train_on_batch(*data)
    for before, after in zip(theta0, frozen_model.multitask.trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())
    assert any(
        not np.array_equal(b, a.numpy())
        for b, a in zip(psi0, frozen_model.label_network.trainable_variables)
    )


def test_virtual_lr_defaults_to_the_model_learning_rate_and_bad_arguments():
    data = _batch()
    explicit = _trainer(model_lr=0.3, virtual_lr=0.3)
    default = _trainer(explicit.multitask, model_lr=0.3, virtual_lr=None)
    default.label_network.set_weights(explicit.label_network.get_weights())
    for a, b in zip(
        explicit.bilevel_gradients(data)["label_grads"],
        default.bilevel_gradients(data)["label_grads"],
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-12)
    # Integer pseudo grades are one-hot encoded by the trainer.
    as_ints = dict(data[0], **{PSEUDO_GRADE: tf.argmax(data[0][PSEUDO_GRADE], axis=-1)})
    for a, b in zip(
        explicit.bilevel_gradients(data)["label_grads"],
        explicit.bilevel_gradients((as_ints, data[1]))["label_grads"],
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-12)
    # Sample weights: losses are still divided by the global batch size.
    weighted = explicit.bilevel_gradients((data[0], data[1], tf.constant([1.0, 1.0, 0.0, 0.0])))
    first_two = explicit.bilevel_gradients(({k: v[:2] for k, v in data[0].items()}, data[1][:2]))
    for a, b in zip(weighted["model_grads"], first_two["model_grads"]):
        np.testing.assert_allclose(a.numpy(), 0.5 * b.numpy(), rtol=1e-4, atol=1e-7)
    trainer = BilevelMultiTaskTrainer(_tiny_multitask(), explicit.label_network)
    for bad in ({"optimizer": "adam"}, {"loss": "mse"}):
        with pytest.raises(TypeError, match="ambiguous"):
            trainer.compile(
                model_optimizer=keras.optimizers.SGD(),
                label_optimizer=keras.optimizers.SGD(),
                **bad,
            )
    with pytest.raises(ValueError, match="pseudo_grade"):
        explicit.bilevel_gradients((data[0][keys.IMAGE], data[1]))
    with pytest.raises(ValueError, match="dict outputs"):
        BilevelMultiTaskTrainer(explicit.label_network, explicit.label_network)
    explicit.compile(
        model_optimizer=keras.optimizers.SGD(),
        label_optimizer=keras.optimizers.SGD(),
        seg_loss=lambda t, p: tf.reduce_mean(losses.categorical_focal_loss(t, p)),
    )
    with pytest.raises(ValueError, match="one loss per example"):
        explicit.bilevel_gradients(data)


def test_fresh_evaluation_loss_goes_down_on_vgg16_unet():
    net = build_vgg16_unet(
        input_shape=(32, 32, 3), num_seg_classes=5, width=1 / 16, grade_pooling="avg"
    )
    label_net = build_label_update_net(input_shape=(32, 32, 3), widths=(4,), hidden=6)
    trainer = BilevelMultiTaskTrainer(net, label_net)
    trainer.compile(
        model_optimizer=keras.optimizers.Adam(3e-3),
        label_optimizer=keras.optimizers.Adam(1e-3),
        beta=0.8,
    )
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 32, 32, 5), np.uint8)
    for i in range(4):
        r, c = rng.integers(0, 24, 2)
        masks[i, r : r + 8, c : c + 8, i] = 1
    x, y = make_training_pair(
        rng.uniform(0, 1, (4, 32, 32, 3)).astype(np.float32), masks, [0, 1, 2, 3]
    )
    ds = tf.data.Dataset.from_tensors((x, y))
    result = trainer.bilevel_gradients((x, y))
    grads = result["model_grads"] + result["label_grads"]
    assert len(grads) == len(trainer.trainable_variables)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0.0 for g in result["model_grads"])
    # A fresh label network is the stage-1 label plus a zero-initialised correction: in the
    # first step only the correction's last layer has a gradient.
    head = {id(v) for v in label_net.get_layer("label_correction").trainable_variables}
    for var, g in zip(label_net.trainable_variables, result["label_grads"]):
        assert (float(tf.reduce_max(tf.abs(g))) > 0.0) == (id(var) in head), var.name
    before = trainer.evaluate(ds, verbose=0, return_dict=True)
    assert set(before) == {"loss", "seg_loss", "grade_loss"}
    trainer.fit(ds.repeat(20), epochs=1, verbose=0)
    after = trainer.evaluate(ds, verbose=0, return_dict=True)
    assert after["seg_loss"] < 0.7 * before["seg_loss"]
    assert after["loss"] < before["loss"]
    assert trainer(x)[keys.SEG_PROBS].shape == (4, 32, 32, 5)


def _replica_trainer(strategy, weights=None):
    with strategy.scope():
        trainer = _trainer(model_lr=0.2, label_lr=50.0, beta=0.8)
        if weights is not None:
            trainer.multitask.set_weights(weights[0])
            trainer.label_network.set_weights(weights[1])
    return trainer


def test_one_and_two_replicas_give_the_same_update(two_replicas):
    data = _batch()
    single = _replica_trainer(tf.distribute.get_strategy())
    weights = (single.multitask.get_weights(), single.label_network.get_weights())
    double = _replica_trainer(two_replicas, weights)

    # The meta-gradient summed over replicas equals the single-device one.
    reference = single.bilevel_gradients(data)
    dist = two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(data).unbatch().batch(4)
    )
    per_replica = two_replicas.run(tf.function(double.bilevel_gradients), args=(next(iter(dist)),))
    for key in ("label_grads", "model_grads"):
        summed = two_replicas.reduce(tf.distribute.ReduceOp.SUM, per_replica[key], axis=None)
        for a, b in zip(reference[key], summed):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=2e-4, atol=1e-9)

    # Two full training steps through fit.
    ds = tf.data.Dataset.from_tensors(data).unbatch().batch(4).repeat(2)
    single.fit(ds, epochs=1, verbose=0, shuffle=False)
    double.fit(ds, epochs=1, verbose=0, shuffle=False)
    for start, net_a, net_b in (
        (weights[0], single.multitask, double.multitask),
        (weights[1], single.label_network, double.label_network),
    ):
        for w0, a, b in zip(start, net_a.get_weights(), net_b.get_weights()):
            delta_a, delta_b = a - w0, b - w0
            assert np.abs(delta_a).max() > 0
            np.testing.assert_allclose(
                delta_b, delta_a, rtol=1e-3, atol=1e-3 * np.abs(delta_a).max()
            )
